"""The driver side of one packed virtqueue (virtio 1.3 2.8), as Linux's virtio_ring drives it.

``MockPackedQueue`` is what ``MockDriver.setup_queue`` builds once VIRTIO_F_RING_PACKED is
negotiated; it keeps ``MockQueue``'s interface (add, add_indirect, kick, kick_needed,
kick_if_needed, get_used, written) so tests run the same traffic over either format. Like
virtqueue_add_packed it writes a chain's descriptors in ring order with AVAIL/USED set from its
wrap counter, the buffer id in every descriptor (the device reads the last one's), and the
head's flags last; like virtqueue_get_buf_ctx_packed it reads used descriptors at its used
position and skips the chain's descriptor count. The raw writers (``write_desc``,
``make_avail``, ``set_driver_event``) let tests build malformed rings. The three queue
addresses are the descriptor ring (``desc``), the driver area (``avail``) and the device area
(``used``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from harness.testing.mockdriver import MockQueue
from harness.virtio import constants as C

_DESC = struct.Struct("<QIHH")
_EVENT = struct.Struct("<HH")  # off_wrap, flags


def avail_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor made available with driver wrap counter ``wrap``."""
    return C.DESC_F_AVAIL if wrap else C.DESC_F_USED


@dataclass
class MockPackedQueue(MockQueue):
    """The driver side of one packed virtqueue over mock memory."""

    next_avail: int = 0
    avail_wrap: int = 1
    next_used: int = 0
    used_wrap: int = 1
    added: int = 0  # descriptors made available since the last kick decision

    def __post_init__(self) -> None:
        self.free = list(range(self.size))  # free buffer ids
        self.ndescs: dict[int, int] = {}

    # ---- raw ring access ---------------------------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        """Descriptor ``i`` (``nxt`` is the buffer id here); flags as given, written last."""
        self.mem.write(self.desc + 16 * i, _DESC.pack(addr, length, nxt, 0))
        self.mem.write(self.desc + 16 * i + 14, struct.pack("<H", flags))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring descriptor ``i``."""
        a, n, bid, f = _DESC.unpack(self.mem.read(self.desc + 16 * i, 16))
        return int(a), int(n), int(bid), int(f)

    def make_avail(self, descs: Sequence[tuple[int, int, int, int]]) -> int:
        """Write (addr, len, id, flags-without-AVAIL/USED) descriptors at the next positions
        as available, the first one's flags last; returns the first position."""
        start = self.next_avail
        head_flags = 0
        for k, (addr, length, bid, flags) in enumerate(descs):
            f = flags | avail_flags(self.avail_wrap)
            if k == 0:
                head_flags = f
                self.mem.write(self.desc + 16 * self.next_avail, _DESC.pack(addr, length, bid, 0))
            else:
                self.write_desc(self.next_avail, addr, length, f, bid)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        self.added += len(descs)
        self.mem.write(self.desc + 16 * start + 14, struct.pack("<H", head_flags))
        return start

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        """The driver area: which used descriptors the driver wants an interrupt for."""
        self.mem.write(self.avail, _EVENT.pack(off_wrap, flags))

    def device_event(self) -> tuple[int, int]:
        """The device area: (off_wrap, flags) of the device's kick wishes."""
        off_wrap, flags = _EVENT.unpack(self.mem.read(self.used, 4))
        return int(off_wrap), int(flags)

    # ---- posting buffers ---------------------------------------------------------------------

    def _id(self) -> int:
        if not self.free:
            raise RuntimeError(f"queue {self.index}: no free buffer id")
        return self.free.pop(0)

    def add(
        self, out: Sequence[bytes] = (), in_: Sequence[int] = (), *, publish: bool = True
    ) -> int:
        """Post a chain of direct descriptors; returns its buffer id."""
        bufs = self._buffers(out, in_)
        bid = self._id()
        n = len(bufs)
        descs = [(b.iova, b.length, bid,
                  (C.DESC_F_WRITE if b.writable else 0) | (C.DESC_F_NEXT if k < n - 1 else 0))
                 for k, b in enumerate(bufs)]  # fmt: skip
        self.make_avail(descs)
        self.buffers[bid] = bufs
        self.ndescs[bid] = n
        return bid

    def add_indirect(self, out: Sequence[bytes] = (), in_: Sequence[int] = ()) -> int:
        """Post a chain through an indirect table (one ring descriptor); its buffer id."""
        bufs = self._buffers(out, in_)
        table = self.mem.alloc(16 * len(bufs))
        for k, b in enumerate(bufs):
            self.mem.write(table + 16 * k, _DESC.pack(b.iova, b.length, 0,
                                                      C.DESC_F_WRITE if b.writable else 0))
        bid = self._id()
        self.make_avail([(table, 16 * len(bufs), bid, C.DESC_F_INDIRECT)])
        self.buffers[bid] = bufs
        self.ndescs[bid] = 1
        return bid

    def publish(self, head: int) -> None:
        raise NotImplementedError("a packed ring publishes a chain as it is added")

    def kick(self) -> None:
        self.added = 0
        self.driver.write(C.NOTIFY_OFFSET + self.index * C.NOTIFY_OFF_MULTIPLIER, 2, self.index)

    def kick_needed(self) -> bool:
        """Linux virtqueue_kick_prepare_packed: the device area decides."""
        off_wrap, flags = self.device_event()
        if flags != C.RING_EVENT_FLAGS_DESC:
            return flags != C.RING_EVENT_FLAGS_DISABLE
        new = self.next_avail
        old = (new - self.added) & 0xFFFF
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.avail_wrap:
            event -= self.size
        return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def kick_if_needed(self) -> bool:
        needed = self.kick_needed()
        if needed:
            self.kick()
        else:
            self.added = 0
        return needed

    # ---- completions -------------------------------------------------------------------------

    def get_used(self) -> list[tuple[int, int]]:
        """New used descriptors (id, len); their ids become free."""
        out = []
        for _ in range(self.size):
            _, length, bid, flags = self.read_desc(self.next_used)
            avail, used = bool(flags & C.DESC_F_AVAIL), bool(flags & C.DESC_F_USED)
            if avail != used or used != bool(self.used_wrap):
                break
            out.append((bid, length))
            self.completed[bid] = self.buffers.pop(bid, [])
            self.next_used += self.ndescs.pop(bid, 1)
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap ^= 1
            self.free.append(bid)
        return out
