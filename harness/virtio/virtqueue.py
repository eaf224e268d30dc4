"""SplitVirtqueue: the device side of one split virtqueue, validating all the guest supplies.

The format-independent half (Chain, QueueStats, the error path, buffer and indirect-table
mapping and their checks) is ``harness.virtio.chain.Virtqueue``, shared with the packed ring
(harness.virtio.packed); the names are re-exported here.

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

A chain is walked by ``_walk_table``: following NEXT, checking each buffer (``_add_buffer``'s
checks, inlined) and mapping it with one batched ``map_sg`` call, descriptor fields from one
``unpack_from`` on the table, in one frame per table. The original three-level walk (walk,
add buffer, per-piece map calls) is the reference model in harness.testing.refwalk, against
which tests/unit/test_walk_fast.py compares this one on hostile rings.

Introspection (``ring_state``, ``dump``) only reads: the ring views the data path already holds
(mapping them first if the data path would), and an indirect table through ``map_page`` like the
data path does. It never maps data buffers, never follows ``next`` further than the data path
would, and applies the same checks with the same words; what it finds wrong goes into the dump
as an ``error`` field, and nothing is counted as a queue error or breaks the queue. The chains
in flight are decoded by harness.virtio.splitdump.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

from harness.dma import Direction
from harness.virtio import splitdump
from harness.virtio.chain import (
    DUMP_BUDGET_PER_DESCRIPTOR,
    U32_MAX,
    Chain,
    ChainError,
    QueueStats,
    TransientMapError,
    Virtqueue,
)
from harness.virtio.constants import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    USED_F_NO_NOTIFY,
)

if sys.byteorder != "little":  # cast("H"/"I") is native order; virtio 1.x rings are LE
    raise ImportError("harness.virtio.virtqueue assumes a little-endian host")

__all__ = ["DUMP_BUDGET_PER_DESCRIPTOR", "Chain", "QueueStats", "SplitVirtqueue", "Virtqueue",
           "ring_sizes"]

_DESC = struct.Struct("<QIHH")
_UNPACK_DESC = _DESC.unpack_from
_TO_DEVICE = Direction.TO_DEVICE
_FROM_DEVICE = Direction.FROM_DEVICE
#: The used-ring id used-idx-backwards leaves in the slot a driver reads past the index: no
#: queue has a descriptor that high (at most 32768).
POISON_ID = 0xFFFFFFFF


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring, used ring), event-idx fields included."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


class SplitVirtqueue(Virtqueue):
    """Device side of one split virtqueue: pop chains, push used entries, decide interrupts.

    The transport writes ``size``, the three addresses, ``msix_vector`` and calls ``enable()``;
    consumers call ``pop``/``unpop``/``push``/``discard`` and then ``flush()`` once per batch,
    which publishes used.idx and says whether the driver wants an interrupt.
    """

    _VIEWS = ("_desc", "_avail16", "_used16", "_used32")

    # ---- configuration (transport side) ------------------------------------------------------

    def _reset_state(self) -> None:
        super()._reset_state()
        self._next_avail = 0  # next avail ring slot the device will pop (free-running u16)
        self._avail_seen = 0  # last avail.idx read from the guest
        self._used_idx = 0  # used.idx including entries pushed but not yet published
        self._published = 0  # used.idx as last published to the guest
        self._notify_on = True  # used.flags NO_NOTIFY clear (the ring starts zeroed)
        self._avail_sync = self._used_sync = self._desc_sync = False

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

    # ---- ring mapping ------------------------------------------------------------------------

    def _ensure_rings(self) -> bool:
        """Map the rings if they are not mapped (lazily after a drop or transient failure)."""
        if self._rings:
            return True
        if not self.enabled or self.broken:
            return False
        handles = self._map_rings(ring_sizes(self.size))
        if handles is None:
            return False
        ops = self._mapops
        desc, avail, used = handles
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

    # ---- availability ------------------------------------------------------------------------

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
        except ChainError as e:
            self.fail(e.reason, e.desc, e.iova)
            return None
        except TransientMapError:
            return None
        self._next_avail = (self._next_avail + 1) & 0xFFFF
        self._outstanding += 1
        return chain

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise ChainError(f"head index {head} out of range (size {size})", head)
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
        """Follow NEXT links from ``first`` in a table of ``n`` descriptors, mapping buffers:
        ``_add_buffer`` and the map call inlined, with its checks in its order and words (a
        guest value is judged exactly as the reference walk, harness.testing.refwalk, judges
        it); only the Python frames and temporaries per descriptor are gone."""
        ops = self._mapops
        max_map = ops.max_mapping_size()
        map_sg = self._map_sg
        name = self.name
        readable = chain.readable
        writable = chain.writable
        i = first
        for _ in range(n):
            addr, length, flags, nxt = _UNPACK_DESC(table, i * DESC_SIZE)
            if flags & DESC_F_INDIRECT:
                self._indirect(i, addr, length, flags, chain, top=top)
            elif length:
                # _add_buffer: the 32-bit total before mapping, readable after writable refused.
                if chain.read_len + chain.write_len + length > U32_MAX:
                    raise ChainError("chain length exceeds 2^32 - 1", i, addr)
                if flags & DESC_F_WRITE:
                    bad = map_sg(writable, addr, length, _FROM_DEVICE, 0, (name, i, flags),
                                 max_map)  # fmt: skip
                    if bad is not None:
                        self._map_failed(bad, i)
                    chain.write_len += length
                else:
                    if writable:
                        raise ChainError("device-readable descriptor after writable", i, addr)
                    bad = map_sg(readable, addr, length, _TO_DEVICE, 0, (name, i, flags),
                                 max_map)  # fmt: skip
                    if bad is not None:
                        self._map_failed(bad, i)
                    chain.read_len += length
            if not flags & DESC_F_NEXT:
                return
            if nxt >= n:
                raise ChainError(f"next {nxt} out of range (table of {n})", i)
            i = nxt
        raise ChainError(f"descriptor loop or chain longer than {n}", first)

    def _indirect(
        self, i: int, addr: int, length: int, flags: int, chain: Chain, *, top: bool
    ) -> None:
        if not self.indirect:
            raise ChainError("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC", i, addr)
        if not top:
            raise ChainError("nested INDIRECT descriptor", i, addr)
        if flags & DESC_F_NEXT:
            raise ChainError("INDIRECT descriptor with NEXT", i, addr)
        # Direct descriptors before it are fine: "the device MUST handle the case of zero or
        # more normal chained descriptors followed by a single descriptor with
        # flags&VIRTQ_DESC_F_INDIRECT" (virtio 1.3 2.7.5.3.2); NEXT on it is refused above.
        self._check_table_length(i, addr, length)
        table = self._read_table(i, addr, length, flags)
        self._walk_table(table, 0, length // DESC_SIZE, chain, top=False)

    def unpop(self, chain: Chain) -> None:
        """Give the most recently popped chain back to the driver, untouched (LIFO)."""
        self._unmap(chain)
        self._next_avail = (self._next_avail - 1) & 0xFFFF
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
        mis = self.misbehave
        fix = False
        if mis is not None:
            held = mis.publish_hold(self.name)
            if held:
                return False  # a wrong used.idx stands for a while (harness.virtio.misbehave)
            fix = held is False  # its time is up: publish the right value, new entries or not
        if (self._used_idx == self._published and not fix) or self._used16 is None:
            return False
        used16 = self._used16
        avail16 = self._avail16
        assert avail16 is not None
        new = self._used_idx
        old = self._published
        bad = None if mis is None else mis.due("publish", self.name,
                                               skip=self._driver_behind(old))
        if bad is None:
            used16[1] = new
        else:
            # used-idx-jump: more than a queue's worth past; used-idx-backwards: one less than
            # the last published. It stands for PUBLISH_HOLD, then a publish corrects it.
            assert mis is not None
            if bad.case == "used-idx-jump":
                used16[1] = (new + self.size + 1) & 0xFFFF
            else:
                self._poison_next_slot(new, old)
                used16[1] = (old - 1) & 0xFFFF
            mis.hold_publish(self.name)
        self._published = new
        self._sync_used()
        if new == old:
            return False  # a wrong used.idx corrected, nothing newly used: nothing to tell
        # The driver must see used.idx before we look at its suppression flags, or both sides
        # can decide the other is not waiting (lost interrupt).
        self._barrier()
        self._sync_avail()
        if self.event_idx:
            event = avail16[2 + self.size]
            wanted = ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            wanted = not avail16[0] & AVAIL_F_NO_INTERRUPT
        if bad is not None:
            return True  # so the driver looks at the wrong value, whatever it asked for
        if not wanted:
            self.stats.interrupts_suppressed += 1
        return wanted

    def _poison_next_slot(self, new: int, old: int) -> None:
        """used-idx-backwards: a driver that trusts the backwards index takes the entries it
        has not seen, then reads on into slot ``new``, the device's own unpublished slot. What
        is there is an entry from a wrap ago, often a head that is in flight again: taken
        silently as a used buffer, and the driver can get back in step when the right index
        comes (graceful in a gate of 2026-12-03; hang in the runs around it). An id no queue
        has there makes what it reads detectably wrong, every time. Not when the new entries
        fill the ring: then that slot holds the first of them."""
        used32 = self._used32
        if used32 is None or (new - old) & 0xFFFF >= self.size:
            return
        slot = new & (self.size - 1)
        used32[1 + 2 * slot] = POISON_ID
        used32[2 + 2 * slot] = 0

    def _driver_behind(self, published: int) -> tuple[str, ...]:
        """The publish cases that must wait: used-idx-backwards while the driver may not have
        taken everything up to ``published`` yet. One less than that is an index the driver
        has not reached then, and it would only stop early (nothing wrong to see: graceful in
        some runs, hang in others). With EVENT_IDX its used_event says where it is (Linux
        writes its last_used_idx there when it re-arms), so the case waits for used_event ==
        ``published``; without EVENT_IDX nothing says, and it acts at once."""
        if not self.event_idx or self._avail16 is None:
            return ()
        self._sync_avail()
        if self._avail16[2 + self.size] == published:
            return ()
        return ("used-idx-backwards",)

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
            "format": "split",
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
        out["in_flight"] = splitdump.in_flight(self, avail_idx, avail16, may_map, errors)
        if errors:
            out["error"] = "; ".join(errors)
        return out
