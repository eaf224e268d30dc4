"""The device's DMA mapping interface (Linux struct virtio_map_ops, seen from the device).

"CPU" in the operation names is the guest, "device" is us. A buffer's life:

- ``map_page(iova, size, direction, attrs, ctx)`` -> DmaHandle. Never raises: a failed mapping
  is a handle for which ``mapping_error(handle)`` is True (``handle.error`` says why;
  ``error.transient`` separates resource failures from guest addresses that are simply wrong).
  Mapping already makes the guest's data visible to the device (as dma_map_page does), so a
  TO_DEVICE buffer needs no sync right after it was mapped.
- ``sync_single_for_device`` before the device reads what the guest wrote since the map
  (TO_DEVICE, BIDIRECTIONAL); ``sync_single_for_cpu`` after the device wrote and before the guest
  may read it (FROM_DEVICE, BIDIRECTIONAL). Callers skip both when ``need_sync`` is False.
- ``unmap_page(handle, direction)`` implies ``sync_single_for_cpu`` (as dma_unmap_page); the view
  must not be touched afterwards.

``attrs`` is Linux's attrs argument; :data:`ATTR_COHERENT` marks memory the guest allocated with
dma_alloc_coherent (the rings): it is never bounced and not bound by ``max_mapping_size``.
``ctx`` says who maps what (queue name, descriptor index, descriptor flags) for the DMA ledger.

Everything in harness.virtio touches guest memory only through this protocol, so a bouncing
implementation, an auditing ledger or fault injection can be layered in without changing it.

``map_pieces`` maps one buffer in pieces (split at ``max_mapping_size`` and where guest memory
is not contiguous), like Linux ``dma_map_sg`` for one scatter-gather entry: a layer may offer
a fused ``map_sg`` with the same signature and results (the ledger does, over direct mapping:
one region lookup per piece instead of three, every check kept); ``sg_mapper`` picks it.
``unmap_pieces`` is the mirror for unmapping (``dma_unmap_sg``): a list of handles, one
``unmap_page`` each, in order; a fused ``unmap_sg`` has the same signature and effects (the
ledger's over direct mapping: every check and counter per handle, no call per handle), and
``sg_unmapper`` picks it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from harness.dma.errors import DmaFault
from harness.dma.memory import GuestMemory, release

if TYPE_CHECKING:
    from harness.dma.memory import GuestRegion


class Direction(enum.IntEnum):
    """Linux enum dma_data_direction (without DMA_NONE)."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2


_TO_DEVICE = Direction.TO_DEVICE  # a module constant: Direction.X costs ~50 ns on 3.11

#: map_page attrs bit: coherent memory (rings). Not a Linux DMA_ATTR_* value: Linux knows this
#: from the allocation, the device only from what the guest told it the memory is.
ATTR_COHERENT = 1 << 0

MapCtx = tuple[str, int, int]
"""(queue name, descriptor index or -1, descriptor flags or -1) of a mapping."""

_EMPTY = memoryview(b"")
DEFAULT_MAX_MAPPING_SIZE = 1 << 32


@dataclass(slots=True, eq=False)
class DmaHandle:
    """One mapping. ``view`` is what the device reads/writes, valid until unmap/free.

    ``iova`` and ``size`` are what was asked for (guest addresses); ``addr`` is where the mapping
    lives for the device (equal to ``iova`` when direct; a bounce IOVA when bouncing; -1 for a
    failed map). ``cookie`` belongs to the MapOps implementation that made the handle.
    ``guest`` is the view into guest memory the mapping holds and ``region`` the guest region it
    is registered with (revocation releases ``guest``, and ``view`` unless ``bounced``).
    """

    iova: int
    size: int
    direction: Direction
    view: memoryview
    addr: int
    error: DmaFault | None = None
    cookie: object = None
    attrs: int = 0
    ctx: MapCtx | None = None
    guest: memoryview | None = None
    region: GuestRegion | None = None
    bounced: bool = False
    revoked: bool = False
    unmapped: bool = False


@runtime_checkable
class MapOps(Protocol):
    """The nine operations of struct virtio_map_ops."""

    def map_page(
        self, iova: int, size: int, direction: Direction, attrs: int = 0,
        ctx: MapCtx | None = None,
    ) -> DmaHandle: ...  # fmt: skip

    def unmap_page(self, handle: DmaHandle, direction: Direction) -> None: ...

    def sync_single_for_cpu(self, handle: DmaHandle, direction: Direction) -> None: ...

    def sync_single_for_device(self, handle: DmaHandle, direction: Direction) -> None: ...

    def alloc(self, size: int) -> DmaHandle: ...

    def free(self, handle: DmaHandle) -> None: ...

    def need_sync(self, handle: DmaHandle) -> bool: ...

    def mapping_error(self, handle: DmaHandle) -> bool: ...

    def max_mapping_size(self) -> int: ...

    # Not one of Linux's nine: the device-side page walk (see GuestMemory.contiguous).
    def contiguous(self, iova: int, size: int) -> int: ...


def failed_handle(
    iova: int, size: int, direction: Direction, fault: DmaFault, ctx: MapCtx | None = None
) -> DmaHandle:
    """The handle a map operation returns when it fails (shared by all implementations)."""
    return DmaHandle(iova, size, direction, _EMPTY, -1, fault, ctx=ctx)


#: ``map_sg(out, iova, length, direction, attrs, ctx, max_map)``: see :func:`map_pieces`.
SgMapper = Callable[
    [list[DmaHandle], int, int, Direction, int, "MapCtx | None", int], "DmaHandle | None"
]


def map_pieces(
    ops: MapOps, out: list[DmaHandle], iova: int, length: int, direction: Direction,
    attrs: int, ctx: MapCtx | None, max_map: int,
) -> DmaHandle | None:  # fmt: skip
    """Map [iova, iova + length) (length > 0) into ``out`` in pieces of at most ``max_map``
    bytes, split where ``ops.contiguous`` says guest memory is not; one ``map_page`` each.

    None when every piece is mapped; otherwise the failed handle of the first piece that
    failed (the pieces before it are in ``out``, for the caller to unmap; the failed one is
    not). The reference for every fused ``map_sg``: same pieces, same calls' checks, same
    handle on failure.
    """
    while True:
        n = length if length <= max_map else max_map
        # Under a vIOMMU a buffer crossing a page boundary spans two DMA regions.
        c = ops.contiguous(iova, n)
        if c < n:
            n = c
        h = ops.map_page(iova, n, direction, attrs, ctx)
        if ops.mapping_error(h):
            return h
        out.append(h)
        length -= n
        if not length:
            return None
        iova += n


def sg_mapper(ops: MapOps) -> SgMapper:
    """``ops.map_sg`` when the layer has a fused one, else :func:`map_pieces` over ``ops``."""
    fused: SgMapper | None = getattr(ops, "map_sg", None)
    if fused is not None:
        return fused

    def generic(
        out: list[DmaHandle], iova: int, length: int, direction: Direction, attrs: int,
        ctx: MapCtx | None, max_map: int,
    ) -> DmaHandle | None:  # fmt: skip
        return map_pieces(ops, out, iova, length, direction, attrs, ctx, max_map)

    return generic


#: ``unmap_sg(handles, direction)``: see :func:`unmap_pieces`.
SgUnmapper = Callable[[list[DmaHandle], Direction], None]


def unmap_pieces(ops: MapOps, handles: list[DmaHandle], direction: Direction) -> None:
    """``ops.unmap_page(h, direction)`` for every handle, in order: the reference for every
    fused ``unmap_sg`` (same calls' checks, counters and effects, in the same order)."""
    for h in handles:
        ops.unmap_page(h, direction)


def sg_unmapper(ops: MapOps) -> SgUnmapper:
    """``ops.unmap_sg`` when the layer has a fused one, else :func:`unmap_pieces` over ``ops``."""
    fused: SgUnmapper | None = getattr(ops, "unmap_sg", None)
    if fused is not None:
        return fused

    def generic(handles: list[DmaHandle], direction: Direction) -> None:
        unmap_pieces(ops, handles, direction)

    return generic


def unregister(handle: DmaHandle) -> None:
    """Detach a mapping from its guest region (it no longer needs revoking)."""
    region = handle.region
    if region is not None:
        region.live.discard(handle)
        handle.region = None


class DirectMapOps:
    """Zero-copy map ops: every handle's view is a slice of GuestMemory, no sync needed.

    Mapping checks that the range lies inside one region and, for FROM_DEVICE/BIDIRECTIONAL,
    that the region is writable; a TO_DEVICE view is read-only, so a device write into it fails
    loudly. ``alloc`` returns device-private coherent memory that the guest cannot see (addr -1):
    direct mapping has no IOVA space of its own to put it in.
    """

    __slots__ = ("_max", "memory")

    def __init__(
        self, memory: GuestMemory, *, max_mapping_size: int = DEFAULT_MAX_MAPPING_SIZE
    ) -> None:
        self.memory = memory
        self._max = max_mapping_size

    def map_page(
        self, iova: int, size: int, direction: Direction, attrs: int = 0,
        ctx: MapCtx | None = None,
    ) -> DmaHandle:  # fmt: skip
        if size > self._max and not attrs & ATTR_COHERENT:
            fault = DmaFault(iova, size, f"larger than max_mapping_size {self._max:#x}")
            return failed_handle(iova, size, direction, fault, ctx)
        try:
            guest, region = self.memory.translate(
                iova, size, write=direction != Direction.TO_DEVICE
            )
        except DmaFault as fault:
            return failed_handle(iova, size, direction, fault, ctx)
        view = guest.toreadonly() if direction == Direction.TO_DEVICE else guest
        h = DmaHandle(iova, size, direction, view, iova, None, None, attrs, ctx, guest, region)
        region.live.add(h)
        return h

    def map_in_region(
        self, region: GuestRegion, iova: int, size: int, direction: Direction, attrs: int,
        ctx: MapCtx | None,
    ) -> DmaHandle:  # fmt: skip
        """``map_page`` for a caller that already looked ``iova`` up in this ``memory`` and
        checked what ``map_page`` would: ``region`` has a view, [iova, iova + size) lies inside
        it, it is writable unless TO_DEVICE, and size is within max_mapping_size unless
        coherent (the ledger's ``map_sg`` does all of that per piece). Saves the second lookup."""
        off = iova - region.iova
        guest = region.view[off : off + size]  # type: ignore[index]
        view = guest.toreadonly() if direction == _TO_DEVICE else guest
        h = DmaHandle(iova, size, direction, view, iova, None, None, attrs, ctx, guest, region)
        region.live.add(h)
        return h

    def unmap_page(self, handle: DmaHandle, direction: Direction) -> None:
        if handle.unmapped:
            return
        handle.unmapped = True
        unregister(handle)
        release(handle.view)
        release(handle.guest)

    def sync_single_for_cpu(self, handle: DmaHandle, direction: Direction) -> None:
        pass

    def sync_single_for_device(self, handle: DmaHandle, direction: Direction) -> None:
        pass

    def alloc(self, size: int) -> DmaHandle:
        return DmaHandle(-1, size, Direction.BIDIRECTIONAL, memoryview(bytearray(size)), -1)

    def free(self, handle: DmaHandle) -> None:
        handle.unmapped = True
        release(handle.view)

    def need_sync(self, handle: DmaHandle) -> bool:
        return False

    def mapping_error(self, handle: DmaHandle) -> bool:
        return handle.error is not None

    def max_mapping_size(self) -> int:
        return self._max

    def contiguous(self, iova: int, size: int) -> int:
        return self.memory.contiguous(iova, size)

    def housekeeping(self) -> None:
        """Once per server loop turn: nothing to do for direct mapping."""

    def stats(self) -> dict[str, object]:
        return {"mode": "direct"}
