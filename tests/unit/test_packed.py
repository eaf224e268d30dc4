"""Packed virtqueues (virtio 1.3 2.8): negotiation, traffic, wrap-around and event suppression.

The driver side is harness.testing.mockpacked (Linux's virtqueue_add_packed /
get_buf_ctx_packed); the device's mappings go through the DMA ledger, so a chain refused half
way must leave nothing mapped. Every malformed ring the device must refuse, and fuzzed rings,
are tests/unit/test_packed_malformed.py (on this module's rig).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness.dma import DirectMapOps, DmaLedger, build_mapops
from harness.testing.mockdriver import FakeBackend, FakeIrq, MockDriver, MockMemory
from harness.testing.mockpacked import MockPackedQueue, avail_flags
from harness.virtio import constants as C
from harness.virtio import features
from harness.virtio.net import DEFAULT_FEATURES, OFFLOAD_FEATURES, VirtioNetDevice
from harness.virtio.packed import PackedVirtqueue, need_event
from harness.virtio.virtqueue import SplitVirtqueue

HDR = bytes(12)
PACKED = DEFAULT_FEATURES | (1 << C.F_RING_PACKED) | (1 << C.F_INDIRECT_DESC)
NO_EVENT_IDX = PACKED & ~(1 << C.F_EVENT_IDX)
RX, TX = 0, 1
RINGS = 6  # mappings of two queues' three ring areas


@dataclass
class Rig:
    device: VirtioNetDevice
    driver: MockDriver
    backend: FakeBackend
    irq: FakeIrq
    ledger: DmaLedger

    def q(self, index: int) -> MockPackedQueue:
        q = self.driver.queues[index]
        assert isinstance(q, MockPackedQueue)
        return q

    @property
    def rx(self) -> MockPackedQueue:
        return self.q(RX)

    @property
    def tx(self) -> MockPackedQueue:
        return self.q(TX)

    def qstat(self, name: str, key: str) -> int:
        per = self.device.stats()[name]
        assert isinstance(per, dict)
        return int(per[key])


def rig(features: int = PACKED, *, size: int | None = None, driver: int | None = None,
        mem_size: int = 4 << 20) -> Rig:  # fmt: skip
    mem = MockMemory(mem_size)
    ops, ledger = build_mapops("direct", mem.memory, bus_master=lambda: True)
    assert ledger is not None
    backend, irq = FakeBackend(), FakeIrq()
    dev = VirtioNetDevice(ops, irq, backend, mac=bytes(6), queue_size=256, features=features,
                          bus_master=lambda: True)  # fmt: skip
    d = MockDriver(dev, mem)
    d.init(driver, queue_size=size)
    return Rig(dev, d, backend, irq, ledger)


def frame(i: int, n: int = 60) -> bytes:
    return HDR + bytes([i & 0xFF]) * n


# ---- negotiation -----------------------------------------------------------------------------


def test_offered_only_when_switched_on_and_used_for_every_queue() -> None:
    assert not features.DEFAULTS.bits >> C.F_RING_PACKED & 1
    on = features.parse("packed=on,ctrl_vq=on")
    assert on.bits >> C.F_RING_PACKED & 1 and on.spec() == "ctrl_vq=on,packed=on"
    split = rig(DEFAULT_FEATURES)
    assert not split.driver.device_features() >> C.F_RING_PACKED & 1
    assert all(type(q) is SplitVirtqueue for q in split.device.queues)
    r = rig(on.bits | DEFAULT_FEATURES)
    assert r.driver.device_features() >> C.F_RING_PACKED & 1
    assert [type(q) for q in r.device.queues] == [PackedVirtqueue] * 3  # rx, tx, ctrl
    assert r.device.tx is r.device.queues[TX]
    # Offered but not taken: split rings (a reset and FEATURES_OK without the bit).
    r.driver.init(PACKED & ~(1 << C.F_RING_PACKED) | (1 << C.NET_F_CTRL_VQ))
    assert all(type(q) is SplitVirtqueue for q in r.device.queues)
    assert r.ledger.live == 3 * 3  # only the new split rings' mappings


def test_any_queue_size_for_packed_rings_power_of_two_for_split() -> None:
    r = rig(size=100)
    assert r.device.tx.size == 100 and not r.device.status & C.STATUS_NEEDS_RESET
    s = rig(DEFAULT_FEATURES, size=256)
    bad = s.device.bad_accesses
    s.driver.write(C.COMMON_STATUS, 1, 0)  # a reset, then size 100 on a split queue: refused
    s.driver.negotiate(DEFAULT_FEATURES)
    s.driver.write(C.COMMON_Q_SELECT, 2, 0)
    s.driver.write(C.COMMON_Q_SIZE, 2, 100)
    assert s.device.bad_accesses == bad + 1 and s.device.rx.size == 256


# ---- traffic ---------------------------------------------------------------------------------


def test_tx_batch_one_interrupt_ids_and_lengths() -> None:
    r = rig()
    ids = [r.tx.add([frame(i)]) for i in range(5)]
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [frame(i) for i in range(5)]
    assert r.tx.get_used() == [(i, 0) for i in ids]
    assert r.irq.count(TX + 1) == 1
    assert r.qstat("tx0", "chains") == 5 and r.ledger.live == RINGS


def test_rx_frames_land_in_the_buffers() -> None:
    r = rig()
    for _ in range(8):
        r.rx.add(in_=[2048])
    r.rx.kick()
    r.device.process()
    frames = [frame(i, 100 + i) for i in range(3)]
    r.backend.rx.extend(frames)
    r.device.on_backend_readable()
    r.device.process()
    used = r.rx.get_used()
    assert [n for _, n in used] == [len(f) for f in frames]
    for (bid, n), f in zip(used, frames, strict=True):
        got = r.rx.written(bid, n)
        assert got[12:] == f[12:] and got[10:12] == b"\x01\x00"  # num_buffers 1 (MRG_RXBUF)


def test_chain_of_descriptors_used_once_and_skipped_by_its_length() -> None:
    r = rig(size=16)
    f = frame(7, 200)
    parts = [f[:12], f[12:50], f[50:120], f[120:]]
    a = r.tx.add(parts)
    b = r.tx.add([frame(8)])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [f, frame(8)]
    # One used descriptor per chain: the first at position 0, the next after the 4 descriptors.
    assert r.tx.read_desc(0)[2] == a and r.tx.read_desc(4)[2] == b
    assert r.tx.get_used() == [(a, 0), (b, 0)] and r.tx.next_used == 5


def test_indirect_tx_and_rx() -> None:
    r = rig()
    r.tx.add_indirect([HDR, b"abc" * 20])
    r.tx.kick()
    r.rx.add_indirect(in_=[12, 2036])
    r.rx.kick()
    r.device.process()
    assert r.backend.tx == [HDR + b"abc" * 20]
    r.backend.rx.append(frame(1, 300))
    r.device.on_backend_readable()
    r.device.process()
    ((bid, n),) = r.rx.get_used()
    assert n == 312 and r.rx.written(bid, n)[12:] == frame(1, 300)[12:]
    assert r.ledger.live == RINGS and not r.device.status & C.STATUS_NEEDS_RESET


@pytest.mark.parametrize("size", [7, 64, 100])
def test_wrap_around_over_many_rounds(size: int) -> None:
    r = rig(size=size)
    sent = 0
    for rnd in range(60):  # chains of 1..3 descriptors and indirect ones: every wrap phase
        batch = []
        for k in range(1 + rnd % 4):
            f = frame(sent, 40 + k)
            batch.append(f)
            sent += 1
            n = (sent % 3) + 1
            if sent % 5 == 0:
                r.tx.add_indirect([f[:12], f[12:]])
            else:
                cuts = [0, *range(12, 12 + n - 1), len(f)][: n + 1]
                r.tx.add([f[cuts[j]:cuts[j + 1]] for j in range(n)])
        r.tx.kick_if_needed()
        r.device.process()
        assert r.backend.tx[-len(batch):] == batch
        assert len(r.tx.get_used()) == len(batch)
    assert len(r.backend.tx) == sent and r.tx.free.__len__() == size
    st_ = r.device.tx.ring_state()
    assert st_["last_avail"] == st_["used_idx"] and not r.device.status & C.STATUS_NEEDS_RESET
    assert r.ledger.live == RINGS


def test_descriptor_not_used_until_its_avail_bit_flips() -> None:
    r = rig(size=8)
    b = r.driver.mem.alloc(62)
    r.driver.mem.write(b, frame(3, 50))
    r.tx.write_desc(0, b, 62, 0, 0)  # addr, len, id in place; AVAIL/USED as zero-initialised
    r.tx.kick()
    r.device.process()
    r.tx.write_desc(0, b, 62, avail_flags(0), 0)  # the other lap's bits: not available now
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [] and not r.device.status & C.STATUS_NEEDS_RESET
    r.tx.write_desc(0, b, 62, avail_flags(1), 0)
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [frame(3, 50)]


def test_device_writes_only_used_descriptors_and_writable_buffers() -> None:
    r = rig(size=16)
    mem = r.driver.mem
    for i in range(3):
        r.tx.add([frame(i)[:12], frame(i)[12:]])
    r.rx.add(in_=[2048])
    r.rx.kick()
    before = bytes(mem.buf)
    r.tx.kick()
    r.device.process()
    r.backend.rx.append(frame(9, 70))
    r.device.on_backend_readable()
    after = bytes(mem.buf)
    allowed = [(r.tx.desc, 16 * 16), (r.rx.desc, 16 * 16), (r.tx.used, 4), (r.rx.used, 4)]
    allowed += [(b.iova, b.length) for bufs in r.rx.buffers.values() for b in bufs]
    for off, (x, y) in enumerate(zip(before, after, strict=True)):
        if x != y:
            iova = mem.base + off
            assert any(a <= iova < a + n for a, n in allowed), hex(iova)
    # The used descriptors: TX's at positions 0, 2, 4 (two descriptors each), flags last.
    used = [r.tx.read_desc(p) for p in (0, 2, 4)]
    assert [(u[2], u[3]) for u in used] == [(i, C.DESC_F_AVAIL | C.DESC_F_USED) for i in range(3)]
    snapshot = bytes(mem.buf[r.tx.desc - mem.base : r.tx.desc - mem.base + 16 * 6])
    r.tx.get_used()
    r.tx.add([frame(5)])
    r.tx.kick()
    r.device.process()  # a later completion leaves the used descriptors before it alone
    assert bytes(mem.buf[r.tx.desc - mem.base : r.tx.desc - mem.base + 16 * 6]) == snapshot


# ---- event suppression -----------------------------------------------------------------------


def test_driver_event_disable_and_enable() -> None:
    r = rig(NO_EVENT_IDX)
    r.tx.set_driver_event(C.RING_EVENT_FLAGS_DISABLE)
    r.tx.add([frame(1)])
    r.tx.kick()
    r.device.process()
    assert r.irq.count(TX + 1) == 0 and r.qstat("tx0", "interrupts_suppressed") == 1
    r.tx.set_driver_event(C.RING_EVENT_FLAGS_ENABLE)
    r.tx.add([frame(2)])
    r.tx.kick()
    r.device.process()
    assert r.irq.count(TX + 1) == 1 and len(r.tx.get_used()) == 2


def test_driver_event_desc_interrupts_only_at_its_position() -> None:
    r = rig(size=8)
    # Linux's enable_cb_delayed: an interrupt once the used position passes 5 (wrap 1).
    r.tx.set_driver_event(C.RING_EVENT_FLAGS_DESC, 5 | 1 << 15)
    for i in range(4):
        r.tx.add([frame(i)])
        r.tx.kick()
        r.device.process()
    assert r.irq.count(TX + 1) == 0 and r.qstat("tx0", "interrupts_suppressed") == 4
    r.tx.add([frame(4)])
    r.tx.add([frame(5)])
    r.tx.kick()
    r.device.process()  # used position 4 -> 6 crosses 5: one interrupt
    assert r.irq.count(TX + 1) == 1
    r.tx.get_used()
    # An event on the next lap (wrap 0, offset 1): not before the used position wraps past it.
    r.tx.set_driver_event(C.RING_EVENT_FLAGS_DESC, 1)
    r.tx.add([frame(6)])
    r.tx.kick()
    r.device.process()  # 6 -> 7
    assert r.irq.count(TX + 1) == 1
    r.tx.add([frame(7)])
    r.tx.add([frame(8)])
    r.tx.add([frame(9)])
    r.tx.kick()
    r.device.process()  # 7 -> 2 of the next lap: passes 1
    assert r.irq.count(TX + 1) == 2


def test_need_event_matches_linux_over_a_lap() -> None:
    size = 10
    for old in range(size):
        for adv in range(1, size):
            new, wrap = old + adv, 1
            if new >= size:
                new, wrap = new - size, 0
            for ev in range(size):
                for ew in (0, 1):
                    # Crossed when the descriptor at the event position was used now:
                    # [old, old + adv) counted along the ring from old's lap (wrap 1).
                    lap = ev + (size if (ew != 1) else 0)
                    crossed = old <= lap < old + adv
                    assert need_event(ev | ew << 15, wrap, new, (new - adv) & 0xFFFF,
                                      size) == crossed, (old, adv, ev, ew)  # fmt: skip


def test_device_event_asks_for_kicks_at_the_next_position() -> None:
    r = rig(size=8)
    r.tx.add([frame(0)])
    r.tx.kick()
    r.device.process()
    # Ring empty: the device asked for a kick at the next position, with its wrap counter.
    assert r.tx.device_event() == (1 | 1 << 15, C.RING_EVENT_FLAGS_DESC)
    r.tx.add([frame(1)])
    assert r.tx.kick_if_needed()
    r.device.tx.disable_notify()
    assert r.tx.device_event()[1] == C.RING_EVENT_FLAGS_DISABLE
    r.tx.add([frame(2)])
    assert not r.tx.kick_needed()
    # enable_notify sees what arrived while kicks were off.
    assert r.device.tx.enable_notify()
    n = rig(NO_EVENT_IDX)
    n.tx.add([frame(0)])
    n.tx.kick()
    n.device.process()
    assert n.tx.device_event()[1] == C.RING_EVENT_FLAGS_ENABLE and n.tx.kick_needed()


def test_rx_waiting_for_room_asks_for_a_kick_past_the_buffers_it_left() -> None:
    # The VM failure this pins: RX (MRG_RXBUF, GSO) left 4 small buffers in the ring waiting
    # for room for a 64 KiB frame and asked for a kick at the first of them, which the driver
    # had already passed: it never kicked again and host->guest TCP stalled.
    r = rig(PACKED | OFFLOAD_FEATURES)
    for _ in range(4):
        r.rx.add(in_=[1526])
    r.rx.kick()
    r.device.process()
    r.backend.rx.append(frame(1, 100))
    r.device.on_backend_readable()
    assert r.qstat("rx0", "no_buffers") >= 1 and r.rx.get_used() == []
    assert r.rx.device_event() == (4 | 1 << 15, C.RING_EVENT_FLAGS_DESC)
    r.rx.added = 0  # the 4 were kicked about
    for _ in range(60):
        r.rx.add(in_=[1526])
    assert r.rx.kick_if_needed()
    r.device.process()
    r.device.on_backend_readable()
    assert [n for _, n in r.rx.get_used()] == [112]


def test_used_flags_written_after_id_and_len_first_element_last() -> None:
    mem = MockMemory()
    seen: list[list[int]] = []
    q = PackedVirtqueue(0, 8, DirectMapOps(mem.memory), name="q", on_error=lambda *_: None,
                        barrier=lambda: seen.append([d.read_desc(i)[3] for i in range(3)]))
    d = MockPackedQueue(MockDriver.__new__(MockDriver), 0, 8, mem.alloc(128), mem.alloc(4),
                        mem.alloc(4))  # fmt: skip
    d.driver.mem = mem
    q.size = 8
    q.desc_addr, q.avail_addr, q.used_addr = d.desc, d.avail, d.used
    assert q.enable(event_idx=False, indirect=False)
    for i in range(3):
        d.add([b"x" * (i + 1)])
    chains = [q.pop() for _ in range(3)]
    seen.clear()
    for c in chains:
        assert c is not None
        q.push(c, 5)
    assert d.get_used() == []  # nothing visible before flush
    assert q.flush()
    avail = avail_flags(1)
    # At the first barrier of the flush: ids and lengths written, every flag still "available".
    assert seen[0] == [avail] * 3
    assert [d.read_desc(i)[1:3] for i in range(3)] == [(5, 0), (5, 1), (5, 2)]
    assert d.get_used() == [(0, 5), (1, 5), (2, 5)]


def test_unpop_gives_the_chain_back() -> None:
    r = rig()
    r.tx.add([frame(1)])
    q = r.device.tx
    c = q.pop()
    assert c is not None and q.outstanding == 1
    q.unpop(c)
    assert q.outstanding == 0 and q.ring_state()["last_avail"] == 1 << 15
    c2 = q.pop()
    assert c2 is not None and c2.head == c.head and c2.read_len == len(frame(1))
    q.discard(c2)
    assert r.ledger.live == RINGS
