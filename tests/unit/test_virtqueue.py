"""Split virtqueue: happy paths, notification suppression, and the map ops' failure modes
(transient map failures, rings unmapped or gone, Bus Master Enable off). Every kind of malformed
ring is tests/unit/test_virtqueue_malformed.py."""

from __future__ import annotations

from harness.dma import Direction, DirectMapOps, DmaFault, DmaHandle, MapCtx, failed_handle
from harness.testing.mockdriver import (
    FakeBackend,
    FakeIrq,
    MockDriver,
    MockMemory,
    MockQueue,
    NetRig,
    net_rig,
)
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES, VirtioNetDevice
from harness.virtio.virtqueue import SplitVirtqueue

HDR = bytes(12)
INDIRECT = DEFAULT_FEATURES | (1 << C.F_INDIRECT_DESC)


def qstat(rig: NetRig, queue: str, key: str) -> int:
    per = rig.device.stats()[queue]
    assert isinstance(per, dict)
    return int(per[key])


def test_tx_batch_one_publish_one_interrupt() -> None:
    r = net_rig()
    frames = [HDR + bytes([i]) * (60 + i) for i in range(32)]
    for f in frames:
        r.tx.add([f[:12], f[12:]])  # header and data in separate descriptors
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == frames
    used = r.tx.get_used()
    assert len(used) == 32 and all(n == 0 for _, n in used)
    assert r.irq.vectors == [2]  # tx0's vector, once for the batch
    assert qstat(r, "tx0", "packets") == 32
    assert qstat(r, "tx0", "bytes") == sum(len(f) - 12 for f in frames)


def test_indirect_chain_when_negotiated() -> None:
    r = net_rig(features=INDIRECT)
    r.tx.add_indirect([HDR, b"abc", b"def"])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [HDR + b"abcdef"]
    assert r.tx.get_used() and not r.device.status & C.STATUS_NEEDS_RESET


def test_full_length_chain_is_fine() -> None:
    r = net_rig(queue_size=8)
    r.tx.add([HDR] + [b"x"] * 7)
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [HDR + b"x" * 7]


def test_index_wraparound() -> None:
    r = net_rig(queue_size=4)
    for round_ in range(70000 // 4 // 4 + 2):  # many passes over the 16-bit indices
        for _ in range(4):
            r.tx.add([HDR + bytes([round_ & 0xFF])])
        r.tx.kick()
        r.device.process()
        assert len(r.tx.get_used()) == 4
        r.backend.tx.clear()
    assert r.tx.used_idx() == r.tx.avail_idx
    assert not r.device.status & C.STATUS_NEEDS_RESET


def test_event_idx_suppresses_interrupt_and_requests_kicks() -> None:
    r = net_rig()
    q = r.tx
    q.set_used_event(5)  # "interrupt me when used idx passes 5"
    for _ in range(3):
        q.add([HDR + b"a"])
    q.kick()
    r.device.process()
    assert r.irq.vectors == []  # used idx 0 -> 3 does not cross 5
    assert q.avail_event() == 3  # device asks for a kick on the next buffer
    for _ in range(3):
        q.add([HDR + b"b"])
    assert q.kick_if_needed()
    r.device.process()
    assert r.irq.vectors == [2]  # 3 -> 6 crosses 5


def test_no_interrupt_flag_without_event_idx() -> None:
    feats = DEFAULT_FEATURES & ~(1 << C.F_EVENT_IDX)
    r = net_rig(features=feats)
    r.tx.set_avail_flags(C.AVAIL_F_NO_INTERRUPT)
    r.tx.add([HDR + b"a"])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx and r.irq.vectors == [] and r.tx.get_used()
    assert r.tx.used_flags() == 0  # notifications re-enabled after draining
    r.tx.set_avail_flags(0)
    r.tx.add([HDR + b"b"])
    r.tx.kick()
    r.device.process()
    assert r.irq.vectors == [2]


def test_barrier_between_used_idx_and_used_event() -> None:
    calls: list[str] = []
    mem = MockMemory()
    ops = DirectMapOps(mem.memory)
    q = SplitVirtqueue(
        0, 8, ops, name="q", on_error=lambda *_: None, barrier=lambda: calls.append("mb")
    )
    d = MockQueue(
        MockDriver.__new__(MockDriver), 0, 8, mem.alloc(128), mem.alloc(22), mem.alloc(70)
    )
    d.driver.mem = mem
    d.driver.event_idx = True
    q.size = 8
    q.desc_addr, q.avail_addr, q.used_addr = d.desc, d.avail, d.used
    assert q.enable(event_idx=True, indirect=False)
    d.add([b"x"])
    chain = q.pop()
    assert chain is not None and bytes(chain.readable[0].view) == b"x"
    calls.clear()
    q.push(chain, 0)
    assert calls == []
    assert q.flush()  # used_event 0: first completion interrupts
    assert calls == ["mb"] and d.used_idx() == 1


# ---- map ops failure modes -------------------------------------------------------------------


class FlakyMapOps(DirectMapOps):
    """Fails every map while ``fail`` is set, transiently (like injected faults)."""

    fail = False

    def map_page(
        self, iova: int, size: int, direction: Direction, attrs: int = 0,
        ctx: MapCtx | None = None,
    ) -> DmaHandle:  # fmt: skip
        if self.fail and direction != Direction.BIDIRECTIONAL:
            return failed_handle(iova, size, direction, DmaFault(iova, size, "x", transient=True))
        return super().map_page(iova, size, direction, attrs, ctx)


def test_transient_map_failure_retries_without_reset() -> None:
    mem = MockMemory()
    ops = FlakyMapOps(mem.memory)
    backend = FakeBackend()
    dev = VirtioNetDevice(ops, FakeIrq(), backend, mac=bytes(6), bus_master=lambda: True)
    d = MockDriver(dev, mem)
    d.init()
    d.queues[1].add([HDR + b"later"])
    ops.fail = True
    d.queues[1].kick()
    dev.process()
    assert backend.tx == [] and not dev.status & C.STATUS_NEEDS_RESET
    assert dev.tx.stats.map_errors == 1
    assert dev.has_work()  # retried without waiting for another kick
    ops.fail = False
    dev.process()
    assert backend.tx == [HDR + b"later"]
    # RX: a transient failure keeps polling instead of declaring starvation.
    d.queues[0].add(in_=[2048])
    d.queues[0].kick()
    dev.process()
    backend.rx.append(HDR + b"in")
    ops.fail = True
    dev.on_backend_readable()
    assert dev.rx_wanted() and list(backend.rx) == [HDR + b"in"]
    ops.fail = False
    dev.on_backend_readable()
    assert not backend.rx and d.queues[0].get_used() == [(0, 14)]


def test_ring_dropped_on_dma_unmap_and_remapped() -> None:
    r = net_rig()
    mem = r.driver.mem
    r.device.dma_unmapped(mem.base, mem.size)
    assert not r.device.tx.overlaps(mem.base, mem.size)  # views dropped
    r.tx.add([HDR + b"after"])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [HDR + b"after"]
    r.device.memory_changed()
    r.tx.add([HDR + b"again"])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx[-1] == HDR + b"again"


def test_ring_memory_gone_is_a_guest_error() -> None:
    r = net_rig()
    mem = r.driver.mem
    r.device.dma_unmapped(mem.base, mem.size)
    mem.memory.remove_range(mem.base, mem.size)
    r.tx.kick()
    r.device.process()  # remap fails: the rings are not in guest memory any more
    assert r.device.status & C.STATUS_NEEDS_RESET


def test_bus_master_off_defers_work() -> None:
    r = net_rig()
    r.bus_master[0] = False
    r.tx.add([HDR + b"x"])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [] and not r.device.rx_wanted()
    r.bus_master[0] = True
    assert r.device.has_work()
    r.device.process()
    assert r.backend.tx == [HDR + b"x"]
