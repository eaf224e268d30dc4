"""SplitVirtqueue: the device side of one split virtqueue, validating all the guest supplies.

Ring memory (descriptor table, avail ring, used ring) is mapped once per queue enable with
``map_page(..., BIDIRECTIONAL, ATTR_COHERENT)`` of the driver's ring addresses and kept until
reset (the guest allocated it with dma_alloc_coherent: never bounced; when ``need_sync`` says so
anyway we sync the avail side before reading it and the used side after writing it). Data
buffers are mapped per chain (TO_DEVICE for device-readable, FROM_DEVICE for device-writable
descriptors; a descriptor longer than ``max_mapping_size`` in several mappings, like a
scatter-gather engine with a segment limit) and unmapped on push/unpop/discard. Every mapping
carries (queue, descriptor, flags) for the DMA ledger.

16-bit ring indices go through ``memoryview.cast("H")`` element access: one aligned 2-byte load
or store, which the guest can never observe half-done (``struct.pack_into`` writes bytewise).
Used entries are written before used.idx, and a full barrier separates publishing used.idx (or
avail_event) from reading avail.flags / used_event / avail.idx again (store->load ordering is
the one x86 reorders).

Any malformed input marks the queue broken, bumps its error counter, logs queue, descriptor and
IOVA, and calls ``on_error``; the device turns that into NEEDS_RESET. Nothing here raises on
guest input.

Introspection (``ring_state``, ``dump``) only reads: the ring views the data path already holds
(mapping them first if the data path would), and an indirect table through ``map_page`` like the
data path does. It never maps data buffers, never follows ``next`` further than the data path
would, and applies the same checks with the same words; what it finds wrong goes into the dump
as an ``error`` field, and nothing is counted as a queue error or breaks the queue.
"""

from __future__ import annotations

import logging
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.dma import ATTR_COHERENT, Direction, DmaHandle, MapOps
from harness.virtio.constants import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    USED_F_NO_NOTIFY,
)
from harness.virtio.misbehave import Misbehave
from harness.virtio.protocols import Barrier, no_barrier

if sys.byteorder != "little":  # cast("H"/"I") is native order; virtio 1.x rings are LE
    raise ImportError("harness.virtio.virtqueue assumes a little-endian host")

log = logging.getLogger(__name__)

_DESC = struct.Struct("<QIHH")
_U32_MAX = 0xFFFFFFFF
#: Steps along ``next`` one dump takes in all, per descriptor of the queue: a valid ring's
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
    #: used.idx was published but the driver asked for no interrupt (EVENT_IDX used_event, or
    #: avail.flags NO_INTERRUPT without EVENT_IDX).
    interrupts_suppressed: int = 0
    #: chains completed into the used ring (a mergeable RX frame may take several).
    chains: int = 0
    errors: int = 0
    drops: int = 0
    map_errors: int = 0
    no_buffers: int = 0


@dataclass(slots=True, eq=False)
class Chain:
    """One popped descriptor chain with its mapped buffers (device-readable first)."""

    head: int
    readable: list[DmaHandle]
    writable: list[DmaHandle]
    read_len: int
    write_len: int


class _ChainError(Exception):
    """A malformed chain: internal, never leaves this module."""

    def __init__(self, reason: str, desc: int, iova: int = -1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.desc = desc
        self.iova = iova


class _TransientMapError(Exception):
    """A data buffer could not be mapped for a reason that may go away."""


class _DumpBudgetSpent(Exception):
    """A dump decoded as many chain entries as it may: internal, never leaves this module."""


@dataclass(slots=True)
class _DumpChain:
    """One in-flight chain as a dump decodes it (descriptors only: buffers are never read)."""

    head: int
    entries: list[dict[str, int | bool]] = field(default_factory=list)
    read_len: int = 0
    write_len: int = 0


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring, used ring), event-idx fields included."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


class SplitVirtqueue:
    """Device side of one split virtqueue: pop chains, push used entries, decide interrupts.

    The transport writes ``size``, the three addresses, ``msix_vector`` and calls ``enable()``;
    consumers call ``pop``/``unpop``/``push``/``discard`` and then ``flush()`` once per batch,
    which publishes used.idx and says whether the driver wants an interrupt.
    """

    def __init__(
        self,
        index: int,
        max_size: int,
        mapops: MapOps,
        *,
        name: str,
        on_error: Callable[[SplitVirtqueue, str], None],
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
        self._next_avail = 0  # next avail ring slot the device will pop (free-running u16)
        self._avail_seen = 0  # last avail.idx read from the guest
        self._used_idx = 0  # used.idx including entries pushed but not yet published
        self._published = 0  # used.idx as last published to the guest
        self._outstanding = 0  # chains popped and not yet pushed/unpopped/discarded
        self._notify_on = True  # used.flags NO_NOTIFY clear (the ring starts zeroed)

    def reset(self) -> None:
        """Device reset: unmap rings, forget everything but the counters."""
        self._reset_state()

    def enable(self, *, event_idx: bool, indirect: bool) -> bool:
        """queue_enable=1: validate the layout and map the rings. False when refused."""
        self.event_idx = event_idx
        self.indirect = indirect
        size = self.size
        if size == 0 or size & (size - 1) or size > self.max_size:
            self.fail(f"queue size {size} invalid", -1)
            return False
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            self.fail(
                f"misaligned rings desc={self.desc_addr:#x} avail={self.avail_addr:#x} "
                f"used={self.used_addr:#x}",
                -1,
            )
            return False
        self.enabled = True
        self._ensure_rings()
        return not self.broken

    def overlaps(self, iova: int, size: int) -> bool:
        """Whether any currently mapped ring lies (partly) in [iova, iova + size)."""
        return any(h.iova < iova + size and iova < h.iova + h.size for h in self._rings)

    def drop_rings(self) -> None:
        """Unmap the rings (their memory is going away); they are remapped on next use."""
        self._drop_rings()

    # ---- ring mapping ------------------------------------------------------------------------

    def _drop_rings(self) -> None:
        for h in self._rings:
            self._mapops.unmap_page(h, Direction.BIDIRECTIONAL)
        self._rings = []
        for attr in ("_desc", "_avail16", "_used16", "_used32"):
            old = getattr(self, attr, None)
            if old is not None:
                old.release()
            setattr(self, attr, None)
        self._avail_sync = self._used_sync = self._desc_sync = False

    def _ensure_rings(self) -> bool:
        """Map the rings if they are not mapped (lazily after a drop or transient failure)."""
        if self._rings:
            return True
        if not self.enabled or self.broken:
            return False
        ops = self._mapops
        handles: list[DmaHandle] = []
        ring_ctx = (self.name, -1, -1)
        for addr, nbytes, what in zip(
            (self.desc_addr, self.avail_addr, self.used_addr),
            ring_sizes(self.size),
            ("descriptor table", "avail ring", "used ring"),
            strict=True,
        ):
            h = ops.map_page(addr, nbytes, Direction.BIDIRECTIONAL, ATTR_COHERENT, ring_ctx)
            if ops.mapping_error(h):
                for done in handles:
                    ops.unmap_page(done, Direction.BIDIRECTIONAL)
                err = h.error
                if err is not None and err.transient:
                    self.stats.map_errors += 1
                    log.debug("%s: %s map failed transiently: %s", self.name, what, err)
                    return False
                self.fail(f"{what} not mappable: {err}", -1, addr)
                return False
            handles.append(h)
        desc, avail, used = handles
        self._rings = handles
        self._desc = desc.view
        self._avail16 = avail.view.cast("H")
        self._used16 = used.view.cast("H")
        self._used32 = used.view[: 4 + 8 * self.size].cast("I")
        self._desc_sync = ops.need_sync(desc)
        self._avail_sync = ops.need_sync(avail)
        self._used_sync = ops.need_sync(used)
        return True

    def _sync_avail(self) -> None:
        if self._desc_sync:
            self._mapops.sync_single_for_device(self._rings[0], Direction.BIDIRECTIONAL)
        if self._avail_sync:
            self._mapops.sync_single_for_device(self._rings[1], Direction.BIDIRECTIONAL)

    def _sync_used(self) -> None:
        if self._used_sync:
            self._mapops.sync_single_for_cpu(self._rings[2], Direction.BIDIRECTIONAL)

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

    # ---- availability ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Enabled, not broken, rings mapped (mapping them now if needed)."""
        return self.enabled and not self.broken and self._ensure_rings()

    def _refresh_avail(self) -> bool:
        """Read avail.idx; True if it moved. A jump beyond the queue size breaks the queue."""
        self._sync_avail()
        avail16 = self._avail16
        assert avail16 is not None
        idx = avail16[1]
        if idx == self._avail_seen:
            return False
        if (idx - self._next_avail) & 0xFFFF > self.size:
            self.fail(
                f"avail idx jumped to {idx} with {self._next_avail} consumed (size {self.size})",
                -1,
                self.avail_addr + 2,
            )
            return False
        # Ring entries and descriptors must be read after the index that published them.
        self._barrier()
        self._avail_seen = idx
        return True

    def pending(self) -> int:
        """How many heads the driver has made available that we have not popped."""
        if not self.ready:
            return 0
        if self._next_avail == self._avail_seen:
            self._refresh_avail()
        if self.broken:
            return 0
        return (self._avail_seen - self._next_avail) & 0xFFFF

    # ---- consuming chains --------------------------------------------------------------------

    def pop(self) -> Chain | None:
        """Next available chain with its buffers mapped; None when empty, broken or blocked."""
        if self.broken or not (self._rings or self._ensure_rings()):
            return None
        if self._next_avail == self._avail_seen and not self._refresh_avail():
            return None
        avail16 = self._avail16
        assert avail16 is not None
        slot = self._next_avail & (self.size - 1)
        head = avail16[2 + slot]
        try:
            chain = self._walk(head)
        except _ChainError as e:
            self.fail(e.reason, e.desc, e.iova)
            return None
        except _TransientMapError:
            return None
        self._next_avail = (self._next_avail + 1) & 0xFFFF
        self._outstanding += 1
        return chain

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise _ChainError(f"head index {head} out of range (size {size})", head)
        table = self._desc
        assert table is not None
        chain = Chain(head, [], [], 0, 0)
        try:
            self._walk_table(table, head, size, chain, top=True)
        except BaseException:
            self._unmap(chain)
            raise
        return chain

    def _walk_table(
        self, table: memoryview, first: int, n: int, chain: Chain, *, top: bool
    ) -> None:
        """Follow NEXT links from ``first`` in a table of ``n`` descriptors, mapping buffers."""
        ops = self._mapops
        max_map = ops.max_mapping_size()
        i = first
        for _ in range(n):
            addr, length, flags, nxt = _DESC.unpack_from(table, i * DESC_SIZE)
            if flags & DESC_F_INDIRECT:
                self._indirect(i, addr, length, flags, chain, top=top)
            elif length:
                # Check the total before mapping: used.len is 32 bits, and a guest asking for
                # more than that must not make us map it first.
                if chain.read_len + chain.write_len + length > _U32_MAX:
                    raise _ChainError("chain length exceeds 2^32 - 1", i, addr)
                if flags & DESC_F_WRITE:
                    self._map_into(
                        chain.writable, addr, length, Direction.FROM_DEVICE, i, flags, max_map
                    )
                    chain.write_len += length
                else:
                    if chain.writable:
                        raise _ChainError("device-readable descriptor after writable", i, addr)
                    self._map_into(
                        chain.readable, addr, length, Direction.TO_DEVICE, i, flags, max_map
                    )
                    chain.read_len += length
            if not flags & DESC_F_NEXT:
                return
            if nxt >= n:
                raise _ChainError(f"next {nxt} out of range (table of {n})", i)
            i = nxt
        raise _ChainError(f"descriptor loop or chain longer than {n}", first)

    def _indirect(
        self, i: int, addr: int, length: int, flags: int, chain: Chain, *, top: bool
    ) -> None:
        if not self.indirect:
            raise _ChainError("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC", i, addr)
        if not top:
            raise _ChainError("nested INDIRECT descriptor", i, addr)
        if flags & DESC_F_NEXT:
            raise _ChainError("INDIRECT descriptor with NEXT", i, addr)
        # Direct descriptors before it are fine: "the device MUST handle the case of zero or
        # more normal chained descriptors followed by a single descriptor with
        # flags&VIRTQ_DESC_F_INDIRECT" (virtio 1.3 2.7.5.3.2); NEXT on it is refused above.
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > 0xFFFF + 1:
            raise _ChainError(f"bad indirect table length {length:#x}", i, addr)
        # Copy: the guest could rewrite the table under us; we validate one snapshot. Mapping
        # made the guest's bytes visible (no sync needed); a long table comes in pieces.
        pieces: list[DmaHandle] = []
        try:
            # The device must ignore WRITE on an indirect descriptor (virtio 1.x 2.7.5.3.2).
            self._map_into(
                pieces,
                addr,
                length,
                Direction.TO_DEVICE,
                i,
                flags & ~DESC_F_WRITE,
                self._mapops.max_mapping_size(),
            )
            table = memoryview(b"".join([h.view for h in pieces]))
        finally:
            for h in pieces:
                self._mapops.unmap_page(h, Direction.TO_DEVICE)
        self._walk_table(table, 0, length // DESC_SIZE, chain, top=False)

    def _map_into(
        self, out: list[DmaHandle], addr: int, length: int, direction: Direction, i: int,
        flags: int, max_map: int,
    ) -> None:  # fmt: skip
        """Map one descriptor's buffer into ``out``, in pieces of at most ``max_map`` bytes
        (on failure the pieces already mapped are in ``out``, for the caller to unmap)."""
        ops = self._mapops
        ctx = (self.name, i, flags)
        while True:
            n = length if length <= max_map else max_map
            # Under a vIOMMU a buffer crossing a page boundary spans two DMA regions.
            c = ops.contiguous(addr, n)
            if c < n:
                n = c
            h = ops.map_page(addr, n, direction, 0, ctx)
            if ops.mapping_error(h):
                self._map_failed(h, i)
            out.append(h)
            length -= n
            if not length:
                return
            addr += n

    def _map_failed(self, h: DmaHandle, i: int) -> None:
        err = h.error
        if err is not None and err.transient:
            self.stats.map_errors += 1
            log.debug("%s: desc %d map failed transiently: %s", self.name, i, err)
            raise _TransientMapError
        raise _ChainError(f"buffer not mappable: {err}", i, h.iova)

    def _unmap(self, chain: Chain) -> None:
        ops = self._mapops
        for h in chain.readable:
            ops.unmap_page(h, Direction.TO_DEVICE)
        for h in chain.writable:
            ops.unmap_page(h, Direction.FROM_DEVICE)  # implies sync_single_for_cpu
        chain.readable = []
        chain.writable = []

    def unpop(self, chain: Chain) -> None:
        """Give the most recently popped chain back to the driver, untouched (LIFO)."""
        self._unmap(chain)
        self._next_avail = (self._next_avail - 1) & 0xFFFF
        self._outstanding -= 1

    def discard(self, chain: Chain) -> None:
        """Unmap a popped chain that will never be completed (the queue is broken)."""
        self._unmap(chain)
        self._outstanding -= 1

    def push(self, chain: Chain, length: int, more: bool = False) -> None:
        """Complete ``chain`` with ``length`` bytes written; visible to the guest on flush().

        ``more``: the next push belongs to the same frame (a merged RX frame's buffers are used
        together, 5.1.6.4); only misbehaviours that reorder completions need to know."""
        self._unmap(chain)
        self._outstanding -= 1
        used32 = self._used32
        if used32 is None:  # rings dropped while the chain was out: nothing to publish into
            return
        head = chain.head
        if self.misbehave is not None:  # its elements, written inside the used ring only
            for uid, ulen in self.misbehave.on_push(self.name, head, length, chain.write_len,
                                                    chain.read_len, self.size, more):
                slot = self._used_idx & (self.size - 1)
                used32[1 + 2 * slot] = uid
                used32[2 + 2 * slot] = ulen
                self._used_idx = (self._used_idx + 1) & 0xFFFF
            self.stats.chains += 1
            return
        slot = self._used_idx & (self.size - 1)
        used32[1 + 2 * slot] = head
        used32[2 + 2 * slot] = length
        self._used_idx = (self._used_idx + 1) & 0xFFFF
        self.stats.chains += 1

    def flush(self) -> bool:
        """Publish used.idx once for everything pushed; True if the driver wants an interrupt."""
        if self._used_idx == self._published or self._used16 is None:
            return False
        used16 = self._used16
        avail16 = self._avail16
        assert avail16 is not None
        new = self._used_idx
        old = self._published
        bad = None if self.misbehave is None else self.misbehave.due("publish", self.name)
        if bad is None:
            used16[1] = new
        elif bad.case == "used-idx-jump":  # the next flush publishes the right value again
            used16[1] = (new + self.size + 1) & 0xFFFF
        else:  # used-idx-backwards
            used16[1] = (old - 1) & 0xFFFF
        self._published = new
        self._sync_used()
        # The driver must see used.idx before we look at its suppression flags, or both sides
        # can decide the other is not waiting (lost interrupt).
        self._barrier()
        self._sync_avail()
        if self.event_idx:
            event = avail16[2 + self.size]
            wanted = ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            wanted = not avail16[0] & AVAIL_F_NO_INTERRUPT
        if not wanted:
            self.stats.interrupts_suppressed += 1
        return wanted

    # ---- notification suppression ------------------------------------------------------------

    def disable_notify(self) -> None:
        """Tell the driver kicks are not needed (we will look at the ring anyway)."""
        # With EVENT_IDX a stale avail_event already suppresses kicks: nothing to write.
        if self.event_idx or not self._notify_on or self._used16 is None:
            return
        self._notify_on = False
        self._used16[0] = USED_F_NO_NOTIFY
        self._sync_used()

    def enable_notify(self) -> bool:
        """Ask for a kick on the next buffer made available; True if one arrived meanwhile."""
        if not self.ready:
            return False
        used16 = self._used16
        assert used16 is not None
        if self.event_idx:
            used16[2 + 4 * self.size] = self._avail_seen
        else:
            used16[0] = 0
            self._notify_on = True
        self._sync_used()
        # Publish the request before re-reading avail.idx: otherwise a buffer added in between
        # would neither be seen now nor kicked about.
        self._barrier()
        return self._refresh_avail()

    # ---- introspection -----------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Chains popped and not yet pushed, unpopped or discarded."""
        return self._outstanding

    def ring_state(self) -> dict[str, int | bool]:
        """The device's side of the ring now; reads no guest memory.

        ``avail_idx`` is the guest's avail.idx as the device last read it, ``last_avail`` the
        next avail slot the device will pop, ``used_idx`` the used.idx it last published.
        """
        return {
            "size": self.size,
            "enabled": self.enabled,
            "broken": self.broken,
            "avail_idx": self._avail_seen,
            "last_avail": self._next_avail,
            "used_idx": self._published,
            "outstanding": self._outstanding,
        }

    def dump(self, *, may_map: bool = True) -> dict[str, Any]:
        """Decode the descriptor table, both rings and the chains in flight, as JSON-ready data.

        In flight are the chains the driver has made available and the device has not returned:
        avail slots from the device's used index up to the guest's avail.idx now. The device
        completes chains in the order it pops them, so the slots it popped and still holds are
        the last ``outstanding`` ones before ``last_avail`` (earlier ones were discarded by a
        broken queue). ``may_map`` False (Bus Master Enable clear) leaves indirect tables
        unread. Every list is bounded by the queue size (a chain lists each descriptor once,
        even when it loops); problems are ``error`` fields.
        """
        out: dict[str, Any] = {
            "index": self.index,
            "name": self.name,
            "size": self.size,
            "enabled": self.enabled,
            "broken": self.broken,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
            "msix_vector": self.msix_vector,
            "addresses": {"desc": self.desc_addr, "avail": self.avail_addr,
                          "used": self.used_addr},
            "device": {
                "avail_idx": self._avail_seen,
                "last_avail": self._next_avail,
                "used_idx": self._published,
                "used_unpublished": (self._used_idx - self._published) & 0xFFFF,
                "outstanding": self._outstanding,
                "notify": self._notify_on,
            },
        }  # fmt: skip
        if not (self._rings or self._ensure_rings()):
            why = ("the queue is broken" if self.broken else
                   "the queue is not enabled" if not self.enabled else
                   "mapping them failed transiently")  # fmt: skip
            out["error"] = f"rings not mapped: {why}"
            return out
        desc, avail16, used16, used32 = self._desc, self._avail16, self._used16, self._used32
        assert desc is not None and avail16 is not None
        assert used16 is not None and used32 is not None
        size = self.size
        self._sync_avail()
        avail_idx = avail16[1]
        self._barrier()  # entries after the index that published them, as pop() reads them
        out["avail"] = {"flags": avail16[0], "idx": avail_idx,
                        "used_event": avail16[2 + size], "ring": avail16[2 : 2 + size].tolist()}
        out["used"] = {
            "flags": used16[0],
            "idx": used16[1],
            "avail_event": used16[2 + 4 * size],
            "ring": [[used32[1 + 2 * s], used32[2 + 2 * s]] for s in range(size)],
        }  # fmt: skip
        out["descriptors"] = [
            {"addr": a, "len": n, "flags": f, "next": x}
            for a, n, f, x in _DESC.iter_unpack(desc[: size * DESC_SIZE])
        ]  # fmt: skip
        errors: list[str] = []
        out["in_flight"] = self._dump_in_flight(avail_idx, avail16, may_map, errors)
        if errors:
            out["error"] = "; ".join(errors)
        return out

    def _dump_in_flight(
        self, avail_idx: int, avail16: memoryview, may_map: bool, errors: list[str]
    ) -> list[dict[str, Any]]:
        size = self.size
        start = self._used_idx
        # Offsets from ``start``: [0, held) discarded, [held, taken) popped, then available.
        taken = (self._next_avail - start) & 0xFFFF
        held = (taken - self._outstanding) & 0xFFFF
        if (avail_idx - self._next_avail) & 0xFFFF > size:
            # What _refresh_avail would refuse: show only what the device has accepted.
            errors.append(f"avail idx jumped to {avail_idx} with {self._next_avail} consumed "
                          f"(size {size})")  # fmt: skip
            avail_idx = self._avail_seen
        count = (avail_idx - start) & 0xFFFF
        if count > size:
            errors.append(f"{count} chains between used idx {start} and avail idx {avail_idx} "
                          f"(size {size}): showing {size}")  # fmt: skip
            count = size
        budget = [DUMP_BUDGET_PER_DESCRIPTOR * size]
        chains: list[dict[str, Any]] = []
        for k in range(count):
            idx = (start + k) & 0xFFFF
            state = "discarded" if k < held else "popped" if k < taken else "available"
            slot = idx & (size - 1)
            entry: dict[str, Any] = {"slot": slot, "idx": idx, "state": state}
            entry.update(self._dump_chain(avail16[2 + slot], may_map, budget))
            chains.append(entry)
        return chains

    def _dump_chain(self, head: int, may_map: bool, budget: list[int]) -> dict[str, Any]:
        """One chain's descriptors, checked as _walk checks them, without mapping buffers."""
        chain = _DumpChain(head)
        error = ""
        size = self.size
        if head >= size:
            error = f"head index {head} out of range (size {size})"
        else:
            table = self._desc
            assert table is not None
            try:
                self._dump_table(table, head, size, chain, budget, may_map, top=True)
            except _ChainError as e:
                where = f"desc {e.desc}" if e.desc >= 0 else ""
                where += f" iova {e.iova:#x}" if e.iova >= 0 else ""
                error = f"{where.strip()}: {e.reason}" if where else e.reason
            except _DumpBudgetSpent:
                error = ("not decoded further: the dump's budget of "
                         f"{DUMP_BUDGET_PER_DESCRIPTOR * size} steps along next is spent")
        out: dict[str, Any] = {"head": head, "descriptors": chain.entries,
                               "read_len": chain.read_len, "write_len": chain.write_len}
        if error:
            out["error"] = error
        return out

    def _dump_table(
        self, table: memoryview, first: int, n: int, chain: _DumpChain, budget: list[int],
        may_map: bool, *, top: bool,
    ) -> None:  # fmt: skip
        """_walk_table's checks, in its order and words, recording instead of mapping."""
        i = first
        seen: set[int] = set()  # a descriptor walked again is not listed again
        for _ in range(n):
            if budget[0] <= 0:
                raise _DumpBudgetSpent
            budget[0] -= 1
            addr, length, flags, nxt = _DESC.unpack_from(table, i * DESC_SIZE)
            if i not in seen:
                seen.add(i)
                entry: dict[str, int | bool] = {"desc": i, "addr": addr, "len": length,
                                                "flags": flags, "next": nxt}
                if not top:
                    entry["indirect"] = True
                chain.entries.append(entry)
            if flags & DESC_F_INDIRECT:
                self._dump_indirect(i, addr, length, flags, chain, budget, may_map, top=top)
            elif length:
                if chain.read_len + chain.write_len + length > _U32_MAX:
                    raise _ChainError("chain length exceeds 2^32 - 1", i, addr)
                if flags & DESC_F_WRITE:
                    chain.write_len += length
                else:
                    if chain.write_len:
                        raise _ChainError("device-readable descriptor after writable", i, addr)
                    chain.read_len += length
            if not flags & DESC_F_NEXT:
                return
            if nxt >= n:
                raise _ChainError(f"next {nxt} out of range (table of {n})", i)
            i = nxt
        raise _ChainError(f"descriptor loop or chain longer than {n}", first)

    def _dump_indirect(
        self, i: int, addr: int, length: int, flags: int, chain: _DumpChain,
        budget: list[int], may_map: bool, *, top: bool,
    ) -> None:  # fmt: skip
        if not self.indirect:
            raise _ChainError("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC", i, addr)
        if not top:
            raise _ChainError("nested INDIRECT descriptor", i, addr)
        if flags & DESC_F_NEXT:
            raise _ChainError("INDIRECT descriptor with NEXT", i, addr)
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > 0xFFFF + 1:
            raise _ChainError(f"bad indirect table length {length:#x}", i, addr)
        if not may_map:
            raise _ChainError("indirect table not read: Bus Master Enable is clear", i, addr)
        # Mapped and copied as _indirect does (a snapshot), under the dump's own ledger name.
        ops = self._mapops
        max_map = ops.max_mapping_size()
        ctx = (f"{self.name} dump", i, flags & ~DESC_F_WRITE)
        pieces: list[DmaHandle] = []
        try:
            at, left = addr, length
            while left:
                n = min(left, max_map)
                c = ops.contiguous(at, n)
                if 0 < c < n:
                    n = c
                h = ops.map_page(at, n, Direction.TO_DEVICE, 0, ctx)
                if ops.mapping_error(h):
                    err = h.error
                    if err is not None and err.transient:
                        raise _ChainError(f"indirect table not mapped now: {err}", i, h.iova)
                    raise _ChainError(f"buffer not mappable: {err}", i, h.iova)
                pieces.append(h)
                left -= n
                at += n
            table = memoryview(b"".join([h.view for h in pieces]))
        finally:
            for h in pieces:
                ops.unmap_page(h, Direction.TO_DEVICE)
        self._dump_table(table, 0, length // DESC_SIZE, chain, budget, may_map, top=False)
