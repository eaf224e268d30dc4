"""PackedVirtqueue: the device side of one packed virtqueue (virtio 1.3 2.8), validating all.

Used for every queue when the driver negotiates VIRTIO_F_RING_PACKED (the transport picks the
format at FEATURES_OK). The three queue addresses of common cfg are the descriptor ring (16-byte
``pvirtq_desc``: addr, len, id, flags), the driver event suppression area (the driver's wishes
about interrupts) and the device event suppression area (ours, about kicks); all three are
mapped once per enable like the split ring's, everything else through MapOps per chain.

Ring state is two positions with a wrap counter each (both start at 1): where the next chain
will be read (``_next_avail``/``_avail_wrap``) and where the next used descriptor goes
(``_used_pos``/``_used_wrap``). A descriptor is available when its AVAIL bit equals the avail
wrap counter and its USED bit does not (2.8.1); a chain's descriptors follow each other in the
ring (NEXT), the buffer id is the last one's. Completing a chain writes one used descriptor
(id, len, flags with AVAIL = USED = the used wrap counter) at the used position and moves it
by the number of ring descriptors the chain took, as Linux's detach_buf_packed expects.
Completions are written in ``flush()``: every id/len first, a barrier, then the flags from
the last to the first, so the driver, which polls the first, sees the batch whole.

Guest values are checked as in the split ring (the shared rules of harness.virtio.chain), plus
the packed ring's own: a chain longer than the queue, a chain descriptor not made available
(with the wrap counter it must have), INDIRECT without the feature, with NEXT or inside a
chain (2.8.19: the driver "MUST NOT write direct descriptors with VIRTQ_DESC_F_INDIRECT set
in a scatter-gather list linked by VIRTQ_DESC_F_NEXT"), a
buffer id out of range (ids are < queue size here: this device's limit, the spec sets none;
Linux allocates them so) or one already in flight. Any of them breaks the queue (``fail``:
NEEDS_RESET); nothing raises. Indirect tables hold packed descriptors used in order, whose
flags other than WRITE (and whose ids) are ignored, as 2.8 says.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

from harness.dma import Direction
from harness.virtio.chain import (
    Chain,
    ChainError,
    DumpChain,
    TransientMapError,
    Virtqueue,
)
from harness.virtio.constants import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    DESC_SIZE,
    EVENT_SUPPRESS_SIZE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
)

if sys.byteorder != "little":  # cast("H"/"I") is native order; virtio 1.x rings are LE
    raise ImportError("harness.virtio.packed assumes a little-endian host")

_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
_WRAP = 1 << 15  # the wrap counter's bit in an off_wrap and in Chain.pos


def packed_ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor ring, driver area, device area)."""
    return DESC_SIZE * size, EVENT_SUPPRESS_SIZE, EVENT_SUPPRESS_SIZE


def need_event(off_wrap: int, wrap: int, new: int, old: int, size: int) -> bool:
    """Whether the event position ``off_wrap`` lies in (old, new] (Linux vring_need_event
    with the packed ring's offset: an event of the other lap counts one ring back)."""
    event = off_wrap & ~_WRAP
    if off_wrap >> 15 != wrap:
        event -= size
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class PackedVirtqueue(Virtqueue):
    """Device side of one packed virtqueue; the same interface as SplitVirtqueue."""

    _VIEWS = ("_desc", "_desc16", "_desc32", "_drv16", "_dev16")
    _AREAS = ("descriptor ring", "driver event area", "device event area")

    def _reset_state(self) -> None:
        super()._reset_state()
        self._next_avail = 0  # ring position of the next chain to pop
        self._avail_wrap = 1
        self._used_pos = 0  # ring position of the next used descriptor (pushed ones counted)
        self._used_wrap = 1
        self._published = 0  # used position (with the wrap bit) as last published
        self._pending: list[tuple[int, int, int, int]] = []  # (pos, wrap, id, len) to write
        self._advanced = 0  # descriptors the pending used elements advance the used position
        self._inflight: dict[int, int] = {}  # buffer id -> pos (with wrap bit) of popped chains
        self._ndescs: dict[int, int] = {}  # buffer id -> ring descriptors its chain took
        self._notify_on = True  # device area flags ENABLE (the area starts zeroed)
        self._sync = False

    # ---- configuration (transport side) ------------------------------------------------------

    def enable(self, *, event_idx: bool, indirect: bool) -> bool:
        """queue_enable=1: validate the layout and map the rings. False when refused."""
        self.event_idx = event_idx
        self.indirect = indirect
        size = self.size
        # Any size up to the maximum (2.8.10.1: "The Queue Size value does not have to be a
        # power of 2"); the
        # positions are 15 bits (off_wrap), so 32768 at most.
        if not 0 < size <= min(self.max_size, _WRAP):
            self.fail(f"queue size {size} invalid", -1)
            return False
        if self.desc_addr % 16 or self.avail_addr % 4 or self.used_addr % 4:
            self.fail(f"misaligned rings desc={self.desc_addr:#x} driver={self.avail_addr:#x} "
                      f"device={self.used_addr:#x}", -1)  # fmt: skip
            return False
        self.enabled = True
        self._ensure_rings()
        return not self.broken

    def _ensure_rings(self) -> bool:
        """Map the rings if they are not mapped (lazily after a drop or transient failure)."""
        if self._rings:
            return True
        if not self.enabled or self.broken:
            return False
        handles = self._map_rings(packed_ring_sizes(self.size))
        if handles is None:
            return False
        desc, drv, dev = handles
        self._desc = desc.view
        self._desc16 = desc.view.cast("H")
        self._desc32 = desc.view.cast("I")
        self._drv16 = drv.view.cast("H")
        self._dev16 = dev.view.cast("H")
        self._sync = any(self._mapops.need_sync(h) for h in handles)
        return True

    def _sync_in(self) -> None:
        if self._sync:
            for h in self._rings[:2]:
                self._mapops.sync_single_for_device(h, Direction.BIDIRECTIONAL)

    def _sync_out(self) -> None:
        if self._sync:
            for h in (self._rings[0], self._rings[2]):
                self._mapops.sync_single_for_cpu(h, Direction.BIDIRECTIONAL)

    # ---- availability ------------------------------------------------------------------------

    @staticmethod
    def _is_avail(flags: int, wrap: int) -> bool:
        return bool(flags & DESC_F_AVAIL) == bool(wrap) and bool(flags & DESC_F_USED) != bool(wrap)

    def _head_avail(self) -> bool:
        self._sync_in()
        desc16 = self._desc16
        assert desc16 is not None
        # flags is the descriptor's last u16: one aligned 2-byte load.
        return self._is_avail(desc16[8 * self._next_avail + 7], self._avail_wrap)

    def pending(self) -> int:
        """1 when a chain is available at the next position, else 0 (packed rings have no
        index to count with)."""
        if not self.ready:
            return 0
        return int(self._head_avail())

    # ---- consuming chains --------------------------------------------------------------------

    def pop(self) -> Chain | None:
        """Next available chain with its buffers mapped; None when empty, broken or blocked."""
        if self.broken or not (self._rings or self._ensure_rings()):
            return None
        if not self._head_avail():
            return None
        # The rest of the descriptors must be read after the flags that published them.
        self._barrier()
        try:
            chain = self._walk(self._next_avail, self._avail_wrap)
        except ChainError as e:
            self.fail(e.reason, e.desc, e.iova)
            return None
        except TransientMapError:
            return None
        self._next_avail, self._avail_wrap = self._step(self._next_avail, self._avail_wrap,
                                                        chain.ndescs)  # fmt: skip
        self._inflight[chain.head] = chain.pos
        self._ndescs[chain.head] = chain.ndescs
        self._outstanding += 1
        return chain

    def _step(self, pos: int, wrap: int, n: int) -> tuple[int, int]:
        pos += n
        while pos >= self.size:
            pos -= self.size
            wrap ^= 1
        return pos, wrap

    def _walk(self, start: int, wrap: int) -> Chain:
        chain = Chain(-1, [], [], 0, 0, 0, start | wrap << 15)
        try:
            self._walk_ring(start, wrap, chain)
        except BaseException:
            self._unmap(chain)
            raise
        return chain

    def _walk_ring(self, start: int, wrap: int, chain: Chain) -> None:
        """Read the chain at ``start`` in ring order, mapping buffers; sets head and ndescs."""
        size = self.size
        table = self._desc
        assert table is not None
        max_map = self._mapops.max_mapping_size()
        i, w = start, wrap
        for n in range(1, size + 1):
            addr, length, bid, flags = _DESC.unpack_from(table, i * DESC_SIZE)
            if n > 1 and not self._is_avail(flags, w):
                raise ChainError(f"chain descriptor {i} not available (flags {flags:#x}, "
                                 f"wrap counter {w})", i)  # fmt: skip
            if flags & DESC_F_INDIRECT:
                self._indirect(i, addr, length, flags, chain, first=n == 1)
            elif length:
                self._add_buffer(chain, i, addr, length, flags, max_map)
            if not flags & DESC_F_NEXT:
                if bid >= size:
                    raise ChainError(f"buffer id {bid} out of range (size {size})", i)
                if bid in self._inflight:
                    raise ChainError(f"buffer id {bid} reused while in flight", i)
                chain.head = bid
                chain.ndescs = n
                return
            i, w = self._step(i, w, 1)
        raise ChainError(f"chain longer than the queue size {size}", start)

    def _indirect(
        self, i: int, addr: int, length: int, flags: int, chain: Chain, *, first: bool
    ) -> None:
        if not self.indirect:
            raise ChainError("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC", i, addr)
        if flags & DESC_F_NEXT:
            raise ChainError("INDIRECT descriptor with NEXT", i, addr)
        if not first:
            raise ChainError("INDIRECT descriptor in a chain linked by NEXT", i, addr)
        self._check_table_length(i, addr, length)
        table = self._read_table(i, addr, length, flags)
        max_map = self._mapops.max_mapping_size()
        # The table is used in order; WRITE is its descriptors' only flag, the rest and the
        # ids are reserved and ignored (2.8 Indirect Descriptors).
        for k, (a, n, _, f) in enumerate(_DESC.iter_unpack(table)):
            if n:
                self._add_buffer(chain, k, a, n, f & DESC_F_WRITE, max_map)

    def unpop(self, chain: Chain) -> None:
        """Give the most recently popped chain back to the driver, untouched (LIFO)."""
        self._unmap(chain)
        self._next_avail, self._avail_wrap = chain.pos & ~_WRAP, chain.pos >> 15
        self._inflight.pop(chain.head, None)
        self._outstanding -= 1

    def discard(self, chain: Chain) -> None:
        """Unmap a popped chain that will never be completed (the queue is broken)."""
        super().discard(chain)
        self._inflight.pop(chain.head, None)

    def push(self, chain: Chain, length: int, more: bool = False) -> None:
        """Complete ``chain`` with ``length`` bytes written; visible to the guest on flush().

        ``more``: the next push belongs to the same frame (for misbehaviours that reorder)."""
        self._unmap(chain)
        self._outstanding -= 1
        self._inflight.pop(chain.head, None)
        elements = [(chain.head, length)]
        if self.misbehave is not None:  # its elements, each a used descriptor in the ring
            elements = self.misbehave.on_push(self.name, chain.head, length, chain.write_len,
                                              chain.read_len, self.size, more)  # fmt: skip
        for bid, ulen in elements:
            # Each used descriptor skips the ring descriptors its chain took (2.8.6: "It then
            # skips forward according to the number of descriptors in the list").
            nd = self._ndescs.get(bid, 1) if bid != chain.head else chain.ndescs
            self._pending.append((self._used_pos, self._used_wrap, bid & 0xFFFF, ulen))
            self._used_pos, self._used_wrap = self._step(self._used_pos, self._used_wrap, nd)
            self._advanced += nd
        self.stats.chains += 1

    def flush(self) -> bool:
        """Write the used descriptors pushed since the last flush; True if the driver wants an
        interrupt (driver area: ENABLE, DISABLE, or with EVENT_IDX the DESC position)."""
        if not self._pending or not self._ensure_rings():
            return False
        desc16, desc32, drv16 = self._desc16, self._desc32, self._drv16
        assert desc16 is not None and desc32 is not None and drv16 is not None
        for pos, _, bid, ulen in self._pending:
            desc32[4 * pos + 2] = ulen & 0xFFFFFFFF
            desc16[8 * pos + 6] = bid
        # id and len before the flags that publish them; the first element's flags last, so
        # the driver, polling it, never sees part of the batch.
        self._barrier()
        for pos, wrap, _, _ in reversed(self._pending):
            desc16[8 * pos + 7] = DESC_F_AVAIL | DESC_F_USED if wrap else 0
        self._pending = []
        advanced, self._advanced = self._advanced, 0
        new = self._used_pos | self._used_wrap << 15
        self._published = new
        self._sync_out()
        # The driver must see the used descriptors before we read its suppression wishes, or
        # both sides can decide the other is not waiting (lost interrupt).
        self._barrier()
        self._sync_in()
        flags = drv16[1] & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            wanted = False
        elif flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            wanted = need_event(drv16[0], self._used_wrap, self._used_pos,
                                (self._used_pos - advanced) & 0xFFFF, self.size)  # fmt: skip
        else:  # ENABLE (DESC without EVENT_IDX and the reserved value 3 too: never lose one)
            wanted = True
        if not wanted:
            self.stats.interrupts_suppressed += 1
        return wanted

    # ---- notification suppression ------------------------------------------------------------

    def disable_notify(self) -> None:
        """Tell the driver kicks are not needed (RING_EVENT_FLAGS_DISABLE in our area)."""
        if not self._notify_on or self._dev16 is None:
            return
        self._notify_on = False
        self._dev16[1] = RING_EVENT_FLAGS_DISABLE
        self._sync_out()

    def enable_notify(self) -> bool:
        """Ask for a kick on the next buffer made available; True if a chain is available now
        (one arrived meanwhile, or the caller left it in the ring: it decides, as RX does).

        "Next" is past everything the driver has made available so far (the split ring's
        avail_event = the avail idx seen): a chain the device left in the ring (RX waiting for
        room for a whole frame) must not be the event, or the driver, already past it, would
        never kick (QEMU's shadow_avail_idx the same way)."""
        if not self.ready:
            return False
        dev16 = self._dev16
        assert dev16 is not None
        end, wrap = self._avail_end()
        if self.event_idx:  # a kick once the driver makes position ``end`` available
            dev16[0] = end | wrap << 15
            self._barrier()  # the position before the flags that make it count
            dev16[1] = RING_EVENT_FLAGS_DESC
        else:
            dev16[1] = RING_EVENT_FLAGS_ENABLE
        self._notify_on = True
        self._sync_out()
        # Publish the request before looking at the ring again: otherwise a buffer made
        # available in between would neither be seen now nor kicked about.
        self._barrier()
        return self._head_avail()

    def _avail_end(self) -> tuple[int, int]:
        """The first position from the next chain on that is not available (every descriptor
        of an available chain carries the AVAIL/USED bits, so no chain needs decoding)."""
        self._sync_in()
        desc16 = self._desc16
        assert desc16 is not None
        pos, wrap = self._next_avail, self._avail_wrap
        for _ in range(self.size):
            if not self._is_avail(desc16[8 * pos + 7], wrap):
                break
            pos, wrap = self._step(pos, wrap, 1)
        return pos, wrap

    # ---- introspection -----------------------------------------------------------------------

    def ring_state(self) -> dict[str, int | bool]:
        """The device's side of the ring now; reads no guest memory. Positions carry their
        wrap counter in bit 15 (``avail_idx`` = ``last_avail``: the next chain's position)."""
        avail = self._next_avail | self._avail_wrap << 15
        return {
            "size": self.size,
            "enabled": self.enabled,
            "broken": self.broken,
            "packed": True,
            "avail_idx": avail,
            "last_avail": avail,
            "used_idx": self._published,
            "outstanding": self._outstanding,
        }

    def dump(self, *, may_map: bool = True) -> dict[str, Any]:
        """The descriptor ring, both event areas and the chains in flight, JSON-ready.

        In flight: the chains popped and not completed (by id, where they started) and the
        chains available from the next position on, decoded with the data path's checks
        (``may_map`` False leaves indirect tables unread). Bounded by the queue size; what is
        wrong is an ``error`` field; nothing is counted or broken."""
        out: dict[str, Any] = {
            "index": self.index, "name": self.name, "size": self.size, "format": "packed",
            "enabled": self.enabled, "broken": self.broken, "event_idx": self.event_idx,
            "indirect": self.indirect, "msix_vector": self.msix_vector,
            "addresses": {"desc": self.desc_addr, "driver": self.avail_addr,
                          "device": self.used_addr},
            "device": {**self.ring_state(), "used_unpublished": len(self._pending),
                       "notify": self._notify_on,
                       "popped": {str(k): v for k, v in self._inflight.items()}},
        }  # fmt: skip
        if not (self._rings or self._ensure_rings()):
            why = ("the queue is broken" if self.broken else
                   "the queue is not enabled" if not self.enabled else
                   "mapping them failed transiently")  # fmt: skip
            out["error"] = f"rings not mapped: {why}"
            return out
        desc, drv16, dev16 = self._desc, self._drv16, self._dev16
        assert desc is not None and drv16 is not None and dev16 is not None
        self._sync_in()
        out["driver_event"] = {"off_wrap": drv16[0], "flags": drv16[1]}
        out["device_event"] = {"off_wrap": dev16[0], "flags": dev16[1]}
        out["descriptors"] = [{"addr": a, "len": n, "id": i, "flags": f}
                              for a, n, i, f in _DESC.iter_unpack(desc)]  # fmt: skip
        desc16 = self._desc16
        assert desc16 is not None
        chains: list[dict[str, Any]] = []
        pos, wrap, seen = self._next_avail, self._avail_wrap, 0
        while seen < self.size and self._is_avail(desc16[8 * pos + 7], wrap):
            entry, n = self._dump_chain(pos, wrap, may_map)
            chains.append(entry)
            if "error" in entry:
                break
            seen += n
            pos, wrap = self._step(pos, wrap, n)
        out["in_flight"] = chains
        return out

    def _dump_chain(self, start: int, wrap: int, may_map: bool) -> tuple[dict[str, Any], int]:
        """One available chain as _walk_ring reads it, recording instead of mapping."""
        table = self._desc
        assert table is not None
        chain = DumpChain(-1)
        i, w, n, error = start, wrap, 0, ""
        try:
            while True:
                if n == self.size:
                    raise ChainError(f"chain longer than the queue size {self.size}", start)
                addr, length, bid, flags = _DESC.unpack_from(table, i * DESC_SIZE)
                n += 1
                chain.entries.append({"desc": i, "addr": addr, "len": length, "id": bid,
                                      "flags": flags})  # fmt: skip
                if n > 1 and not self._is_avail(flags, w):
                    raise ChainError(f"chain descriptor {i} not available", i)
                if flags & DESC_F_INDIRECT:
                    if not self.indirect or flags & DESC_F_NEXT or n > 1:
                        raise ChainError("INDIRECT descriptor misused", i, addr)
                    self._check_table_length(i, addr, length)
                    for k, (a, m, _, f) in enumerate(_DESC.iter_unpack(
                            self._dump_table(i, addr, length, flags, may_map))):
                        chain.entries.append({"desc": k, "addr": a, "len": m, "flags": f,
                                              "indirect": True})  # fmt: skip
                        if m:
                            self._dump_add(chain, i, a, m, f & DESC_F_WRITE)
                elif length:
                    self._dump_add(chain, i, addr, length, flags)
                if not flags & DESC_F_NEXT:
                    chain.head = bid
                    break
                i, w = self._step(i, w, 1)
        except ChainError as e:
            error = f"desc {e.desc}: {e.reason}"
        out: dict[str, Any] = {"slot": start, "state": "available", "head": chain.head,
                               "descriptors": chain.entries, "read_len": chain.read_len,
                               "write_len": chain.write_len}  # fmt: skip
        if error:
            out["error"] = error
        return out, n
