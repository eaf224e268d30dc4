"""The format-independent half of a virtqueue: chains, counters, errors, buffer mapping.

``Virtqueue`` is the base of both ring formats (``SplitVirtqueue`` in harness.virtio.virtqueue,
``PackedVirtqueue`` in harness.virtio.packed) and the type the transport and the net device
hold. It owns what does not depend on the ring layout: the transport-written configuration
(size, the three ring addresses, vector), mapping the three ring areas once per enable, the
error path (``fail``: counted, logged once, ``on_error`` turns it into NEEDS_RESET), and the
checks and mapping of one descriptor's buffer and of an indirect table, shared by both walks
so a guest value is judged by the same rule in both formats:

- a chain's total length above 2^32 - 1 is refused before anything is mapped (used len is 32
  bits);
- a device-readable buffer after a device-writable one is refused;
- every buffer goes through ``MapOps.map_page`` (TO_DEVICE for readable, FROM_DEVICE for
  writable, in pieces of at most ``max_mapping_size`` and split where guest memory is not
  contiguous); a permanent mapping failure is a guest error, a transient one
  (``TransientMapError``) leaves the chain in the ring for a later retry;
- an indirect table is mapped, copied (the guest may rewrite it under us: we validate one
  snapshot) and unmapped; its length must be a non-zero multiple of 16.

A buffer is mapped with one ``map_sg`` call (harness.dma.mapops.sg_mapper: the ledger's fused
per-piece path) and a chain's buffers unmapped with one ``unmap_sg`` call per side. The
per-piece ``contiguous`` + ``map_page`` + ``mapping_error`` loop this replaced (issue 12's round
4) is the reference model in harness.testing.refwalk; tests/unit/test_walk_fast.py compares the
two on hostile rings (same checks, order and words).

Nothing here raises on guest input out of the package: ``ChainError`` and
``TransientMapError`` are caught by the ring classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.dma import (
    ATTR_COHERENT,
    Direction,
    DmaHandle,
    MapOps,
    SgMapper,
    SgUnmapper,
    sg_mapper,
    sg_unmapper,
)
from harness.virtio.constants import DESC_F_WRITE, DESC_SIZE
from harness.virtio.misbehave import Misbehave
from harness.virtio.protocols import Barrier, no_barrier

log = logging.getLogger("harness.virtio.virtqueue")  # one logger name for both formats

U32_MAX = 0xFFFFFFFF
_TO_DEVICE = Direction.TO_DEVICE  # module constants: Direction.X is ~50 ns an access on 3.11
_FROM_DEVICE = Direction.FROM_DEVICE
#: Steps along a chain one dump takes in all, per descriptor of the queue: a valid ring's
#: in-flight chains share no descriptor, so they need at most one each, plus their indirect
#: tables (chains past the budget say so); a garbage ring may send every head into the same
#: long loop, and must cost neither a long walk nor a huge reply.
DUMP_BUDGET_PER_DESCRIPTOR = 4


@dataclass(slots=True)
class QueueStats:
    """Per-queue counters (exported by the device's stats())."""

    packets: int = 0
    bytes: int = 0
    kicks: int = 0
    interrupts: int = 0
    #: used entries were published but the driver asked for no interrupt (EVENT_IDX
    #: used_event / off_wrap, NO_INTERRUPT, or the packed ring's RING_EVENT_FLAGS_DISABLE).
    interrupts_suppressed: int = 0
    #: chains completed into the used ring (a mergeable RX frame may take several).
    chains: int = 0
    errors: int = 0
    drops: int = 0
    map_errors: int = 0
    no_buffers: int = 0


@dataclass(slots=True, eq=False)
class Chain:
    """One popped descriptor chain with its mapped buffers (device-readable first).

    ``head`` is the split ring's head index, or the packed ring's buffer id; ``ndescs`` and
    ``pos`` are the packed ring's: ring descriptors the chain took and where it started (the
    position with the avail wrap counter in bit 15), for the used descriptor and ``unpop``.
    """

    head: int
    readable: list[DmaHandle]
    writable: list[DmaHandle]
    read_len: int
    write_len: int
    ndescs: int = 1
    pos: int = 0


class ChainError(Exception):
    """A malformed chain (internal to the ring classes, which turn it into ``fail``)."""

    def __init__(self, reason: str, desc: int, iova: int = -1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.desc = desc
        self.iova = iova


class TransientMapError(Exception):
    """A data buffer could not be mapped for a reason that may go away."""


class DumpBudgetSpent(Exception):
    """A dump decoded as many chain entries as it may (internal to the ring classes)."""


@dataclass(slots=True)
class DumpChain:
    """One in-flight chain as a dump decodes it (descriptors only: buffers are never read)."""

    head: int
    entries: list[dict[str, int | bool]] = field(default_factory=list)
    read_len: int = 0
    write_len: int = 0


class Virtqueue:
    """What both ring formats share; the subclasses implement the ring itself.

    The transport writes ``size``, the three addresses (``desc_addr``, ``avail_addr``,
    ``used_addr``: the packed ring's descriptor ring, driver and device areas), ``msix_vector``
    and calls ``enable()``; consumers call ``pop``/``unpop``/``push``/``discard`` and then
    ``flush()`` once per batch, which publishes and says whether the driver wants an interrupt.
    """

    #: Attribute names of the ring views a subclass derives from its mappings.
    _VIEWS: tuple[str, ...] = ()
    #: Names of the three ring areas, for log lines.
    _AREAS: tuple[str, str, str] = ("descriptor table", "avail ring", "used ring")

    def __init__(
        self,
        index: int,
        max_size: int,
        mapops: MapOps,
        *,
        name: str,
        on_error: Callable[[Virtqueue, str], None],
        barrier: Barrier = no_barrier,
    ) -> None:
        self.index = index
        self.name = name
        self.max_size = max_size
        self.stats = QueueStats()
        self._mapops = mapops
        self._on_error = on_error
        self._barrier = barrier
        self._rings: list[DmaHandle] = []
        #: Active misbehaviours (harness.virtio.misbehave), None when the device behaves.
        self.misbehave: Misbehave | None = None
        self._map_sg: SgMapper = sg_mapper(mapops)
        #: One call per chain side on push/unpop/discard (the ledger's fused loop when it has
        #: one; any layer's unmap_page per handle otherwise).
        self._unmap_sg: SgUnmapper = sg_unmapper(mapops)
        self._reset_state()

    # ---- configuration (transport side) ------------------------------------------------------

    def _reset_state(self) -> None:
        self.size = self.max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.msix_vector = 0xFFFF
        self.enabled = False
        self.broken = False
        self.event_idx = False
        self.indirect = False
        self._drop_rings()
        self._outstanding = 0  # chains popped and not yet pushed/unpopped/discarded

    def reset(self) -> None:
        """Device reset: unmap rings, forget everything but the counters."""
        self._reset_state()

    def overlaps(self, iova: int, size: int) -> bool:
        """Whether any currently mapped ring lies (partly) in [iova, iova + size)."""
        return any(h.iova < iova + size and iova < h.iova + h.size for h in self._rings)

    def drop_rings(self) -> None:
        """Unmap the rings (their memory is going away); they are remapped on next use."""
        self._drop_rings()

    def _drop_rings(self) -> None:
        for h in self._rings:
            self._mapops.unmap_page(h, Direction.BIDIRECTIONAL)
        self._rings = []
        for attr in self._VIEWS:
            old = getattr(self, attr, None)
            if old is not None:
                old.release()
            setattr(self, attr, None)

    def _map_rings(self, sizes: tuple[int, int, int]) -> list[DmaHandle] | None:
        """Map the three ring areas (coherent, both ways); None when that failed (a permanent
        failure has broken the queue, a transient one is counted and retried later)."""
        ops = self._mapops
        handles: list[DmaHandle] = []
        ring_ctx = (self.name, -1, -1)
        for addr, nbytes, what in zip(
            (self.desc_addr, self.avail_addr, self.used_addr), sizes, self._AREAS, strict=True
        ):
            h = ops.map_page(addr, nbytes, Direction.BIDIRECTIONAL, ATTR_COHERENT, ring_ctx)
            if ops.mapping_error(h):
                for done in handles:
                    ops.unmap_page(done, Direction.BIDIRECTIONAL)
                err = h.error
                if err is not None and err.transient:
                    self.stats.map_errors += 1
                    log.debug("%s: %s map failed transiently: %s", self.name, what, err)
                    return None
                self.fail(f"{what} not mappable: {err}", -1, addr)
                return None
            handles.append(h)
        self._rings = handles
        return handles

    def _ensure_rings(self) -> bool:
        raise NotImplementedError

    # ---- errors ------------------------------------------------------------------------------

    def fail(self, reason: str, desc: int = -1, iova: int = -1) -> None:
        """Report malformed guest input: count, log, break the queue, tell the device (once)."""
        self.stats.errors += 1
        if self.broken:
            return
        self.broken = True
        where = f" desc {desc}" if desc >= 0 else ""
        at = f" iova {iova:#x}" if iova >= 0 else ""
        log.error("virtqueue %s (%d)%s%s: %s", self.name, self.index, where, at, reason)
        self._on_error(self, reason)

    # ---- the ring interface (implemented per format) -----------------------------------------

    @property
    def ready(self) -> bool:
        """Enabled, not broken, rings mapped (mapping them now if needed)."""
        return self.enabled and not self.broken and self._ensure_rings()

    @property
    def outstanding(self) -> int:
        """Chains popped and not yet pushed, unpopped or discarded."""
        return self._outstanding

    def enable(self, *, event_idx: bool, indirect: bool) -> bool:
        """queue_enable=1: validate the layout and map the rings. False when refused."""
        raise NotImplementedError

    def pending(self) -> int:
        """How many chains the driver has made available that we have not popped (at least
        one when any is; the packed ring cannot count them without walking)."""
        raise NotImplementedError

    def pop(self) -> Chain | None:
        """Next available chain with its buffers mapped; None when empty, broken or blocked."""
        raise NotImplementedError

    def unpop(self, chain: Chain) -> None:
        """Give the most recently popped chain back to the driver, untouched (LIFO)."""
        raise NotImplementedError

    def discard(self, chain: Chain) -> None:
        """Unmap a popped chain that will never be completed (the queue is broken)."""
        self._unmap(chain)
        self._outstanding -= 1

    def push(self, chain: Chain, length: int, more: bool = False) -> None:
        """Complete ``chain`` with ``length`` bytes written; visible to the guest on flush()."""
        raise NotImplementedError

    def flush(self) -> bool:
        """Publish everything pushed; True if the driver wants an interrupt."""
        raise NotImplementedError

    def disable_notify(self) -> None:
        """Tell the driver kicks are not needed (we will look at the ring anyway)."""
        raise NotImplementedError

    def enable_notify(self) -> bool:
        """Ask for a kick on the next buffer made available; True if one arrived meanwhile."""
        raise NotImplementedError

    def ring_state(self) -> dict[str, int | bool]:
        """The device's side of the ring now; reads no guest memory."""
        raise NotImplementedError

    def dump(self, *, may_map: bool = True) -> dict[str, Any]:
        """The rings and the chains in flight decoded, as JSON-ready data."""
        raise NotImplementedError

    # ---- one descriptor's buffer, an indirect table ------------------------------------------

    def _add_buffer(
        self, chain: Chain, i: int, addr: int, length: int, flags: int, max_map: int
    ) -> None:
        """Check and map one direct descriptor's buffer into ``chain`` (length > 0)."""
        # Check the total before mapping: used len is 32 bits, and a guest asking for more
        # than that must not make us map it first.
        if chain.read_len + chain.write_len + length > U32_MAX:
            raise ChainError("chain length exceeds 2^32 - 1", i, addr)
        if flags & DESC_F_WRITE:
            self._map_into(chain.writable, addr, length, Direction.FROM_DEVICE, i, flags, max_map)
            chain.write_len += length
        else:
            if chain.writable:
                raise ChainError("device-readable descriptor after writable", i, addr)
            self._map_into(chain.readable, addr, length, Direction.TO_DEVICE, i, flags, max_map)
            chain.read_len += length

    def _read_table(self, i: int, addr: int, length: int, flags: int, name: str = "") -> memoryview:
        """A copy of the indirect table at ``addr`` (length already checked); ``name`` the
        ledger name (a dump's own). Transient mapping failures raise TransientMapError."""
        # Copy: the guest could rewrite the table under us; we validate one snapshot. Mapping
        # made the guest's bytes visible (no sync needed); a long table comes in pieces.
        pieces: list[DmaHandle] = []
        try:
            # The device must ignore WRITE on an indirect descriptor (virtio 1.x 2.7.5.3.2).
            self._map_into(pieces, addr, length, Direction.TO_DEVICE, i, flags & ~DESC_F_WRITE,
                           self._mapops.max_mapping_size(), name)  # fmt: skip
            return memoryview(b"".join([h.view for h in pieces]))
        finally:
            if pieces:
                self._unmap_sg(pieces, _TO_DEVICE)

    @staticmethod
    def _check_table_length(i: int, addr: int, length: int) -> None:
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > 0xFFFF + 1:
            raise ChainError(f"bad indirect table length {length:#x}", i, addr)

    def _map_into(
        self, out: list[DmaHandle], addr: int, length: int, direction: Direction, i: int,
        flags: int, max_map: int, name: str = "",
    ) -> None:  # fmt: skip
        """Map one descriptor's buffer into ``out`` with one batched call, in pieces of at most
        ``max_map`` bytes (on failure the pieces already mapped are in ``out``, for the caller
        to unmap); ``name`` the ledger name (a dump's own)."""
        h = self._map_sg(out, addr, length, direction, 0, (name or self.name, i, flags), max_map)
        if h is not None:
            self._map_failed(h, i, count=not name)

    def _map_failed(self, h: DmaHandle, i: int, *, count: bool = True) -> None:
        err = h.error
        if err is not None and err.transient:
            if count:  # a dump's failure is its own, not the data path's
                self.stats.map_errors += 1
            log.debug("%s: desc %d map failed transiently: %s", self.name, i, err)
            raise TransientMapError
        raise ChainError(f"buffer not mappable: {err}", i, h.iova)

    def _unmap(self, chain: Chain) -> None:
        # Readable first, then writable, as unmap_page per handle did; an empty side costs no
        # call (a TX chain has no writable buffers, an RX chain no readable ones).
        if chain.readable:
            self._unmap_sg(chain.readable, _TO_DEVICE)
            chain.readable = []
        if chain.writable:
            self._unmap_sg(chain.writable, _FROM_DEVICE)  # implies sync_single_for_cpu
            chain.writable = []

    # ---- the same checks for a dump (recording instead of mapping) ---------------------------

    @staticmethod
    def _dump_add(chain: DumpChain, i: int, addr: int, length: int, flags: int) -> None:
        """_add_buffer's checks, in its words, counting instead of mapping."""
        if chain.read_len + chain.write_len + length > U32_MAX:
            raise ChainError("chain length exceeds 2^32 - 1", i, addr)
        if flags & DESC_F_WRITE:
            chain.write_len += length
        else:
            if chain.write_len:
                raise ChainError("device-readable descriptor after writable", i, addr)
            chain.read_len += length

    def _dump_table(self, i: int, addr: int, length: int, flags: int, may_map: bool) -> memoryview:
        """An indirect table for a dump, mapped as the data path maps it, under the dump's own
        ledger name; a transient failure is an ``error`` field, not a retry."""
        if not may_map:
            raise ChainError("indirect table not read: Bus Master Enable is clear", i, addr)
        try:
            return self._read_table(i, addr, length, flags, f"{self.name} dump")
        except TransientMapError:
            raise ChainError("indirect table not mapped now: transient mapping failure",
                             i, addr) from None
