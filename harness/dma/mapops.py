"""The device's DMA mapping interface (Linux struct virtio_map_ops, seen from the device).

"CPU" in the operation names is the guest, "device" is us. A buffer's life:

- ``map_page(iova, size, direction)`` -> DmaHandle. Never raises: a failed mapping is a handle
  for which ``mapping_error(handle)`` is True (``handle.error`` says why; ``error.transient``
  separates resource failures from guest addresses that are simply wrong).
- ``sync_single_for_device`` before the device reads what the guest wrote (TO_DEVICE,
  BIDIRECTIONAL); ``sync_single_for_cpu`` after the device wrote and before the guest may read it
  (FROM_DEVICE, BIDIRECTIONAL). Callers skip both when ``need_sync(handle)`` is False.
- ``unmap_page(handle, direction)``: the view must not be touched afterwards.

Everything in harness.virtio touches guest memory only through this protocol, so a bouncing
implementation, an auditing ledger or fault injection can be layered in without changing it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from harness.dma.errors import DmaFault
from harness.dma.memory import GuestMemory


class Direction(enum.IntEnum):
    """Linux enum dma_data_direction (without DMA_NONE)."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2


_EMPTY = memoryview(b"")


@dataclass(slots=True, eq=False)
class DmaHandle:
    """One mapping. ``view`` is what the device reads/writes, valid until unmap/free.

    ``iova`` and ``size`` are what was asked for (guest addresses); ``addr`` is where the mapping
    lives for the device (equal to ``iova`` when direct; a bounce slot when bouncing; -1 for a
    failed map). ``cookie`` belongs to the MapOps implementation that made the handle.
    """

    iova: int
    size: int
    direction: Direction
    view: memoryview
    addr: int
    error: DmaFault | None = None
    cookie: object = None


@runtime_checkable
class MapOps(Protocol):
    """The nine operations of struct virtio_map_ops."""

    def map_page(self, iova: int, size: int, direction: Direction) -> DmaHandle: ...

    def unmap_page(self, handle: DmaHandle, direction: Direction) -> None: ...

    def sync_single_for_cpu(self, handle: DmaHandle, direction: Direction) -> None: ...

    def sync_single_for_device(self, handle: DmaHandle, direction: Direction) -> None: ...

    def alloc(self, size: int) -> DmaHandle: ...

    def free(self, handle: DmaHandle) -> None: ...

    def need_sync(self, handle: DmaHandle) -> bool: ...

    def mapping_error(self, handle: DmaHandle) -> bool: ...

    def max_mapping_size(self) -> int: ...


def _release(view: memoryview) -> None:
    # Releasing turns any later use of the view into a ValueError instead of silently touching
    # memory the guest may have taken back. A live buffer export (a consumer still holding it)
    # makes release impossible; that consumer's reference then simply outlives the mapping.
    # (try/except rather than contextlib.suppress: this runs per buffer, and try is free.)
    try:  # noqa: SIM105
        view.release()
    except BufferError:
        pass


def failed_handle(iova: int, size: int, direction: Direction, fault: DmaFault) -> DmaHandle:
    """The handle a map operation returns when it fails (shared by all implementations)."""
    return DmaHandle(iova, size, direction, _EMPTY, -1, fault)


class DirectMapOps:
    """Zero-copy map ops: every handle's view is a slice of GuestMemory, no sync needed.

    Mapping checks that the range lies inside one region and, for FROM_DEVICE/BIDIRECTIONAL,
    that the region is writable. ``alloc`` returns device-private coherent memory that the guest
    cannot see (addr -1): direct mapping has no IOVA space of its own to put it in.
    """

    __slots__ = ("_max", "memory")

    def __init__(self, memory: GuestMemory, *, max_mapping_size: int = 1 << 32) -> None:
        self.memory = memory
        self._max = max_mapping_size

    def map_page(self, iova: int, size: int, direction: Direction) -> DmaHandle:
        if size > self._max:
            fault = DmaFault(iova, size, f"larger than max_mapping_size {self._max:#x}")
            return failed_handle(iova, size, direction, fault)
        try:
            view = self.memory.view(iova, size, write=direction != Direction.TO_DEVICE)
        except DmaFault as fault:
            return failed_handle(iova, size, direction, fault)
        return DmaHandle(iova, size, direction, view, iova)

    def unmap_page(self, handle: DmaHandle, direction: Direction) -> None:
        _release(handle.view)

    def sync_single_for_cpu(self, handle: DmaHandle, direction: Direction) -> None:
        pass

    def sync_single_for_device(self, handle: DmaHandle, direction: Direction) -> None:
        pass

    def alloc(self, size: int) -> DmaHandle:
        return DmaHandle(-1, size, Direction.BIDIRECTIONAL, memoryview(bytearray(size)), -1)

    def free(self, handle: DmaHandle) -> None:
        _release(handle.view)

    def need_sync(self, handle: DmaHandle) -> bool:
        return False

    def mapping_error(self, handle: DmaHandle) -> bool:
        return handle.error is not None

    def max_mapping_size(self) -> int:
        return self._max
