"""VIRTIO_F_RING_RESET: queue_reset resets one queue alone (virtio 1.3 2.6.1, 4.1.4.3).

The device is driven through BAR0 only, with the steps of Linux's vp_modern_set_queue_reset
and vp_modern_enable_vq_after_reset (MockDriver.reset_queue, then setup_queue), over a DMA
ledger so that "unmaps everything it holds" is checked by the ledger's live count.
"""

from __future__ import annotations

import struct

import pytest

from harness.dma import DmaLedger
from harness.dma.factory import build_mapops
from harness.testing.mockdriver import (
    FakeBackend,
    FakeIrq,
    MockDriver,
    MockMemory,
    NetRig,
    net_rig,
)
from harness.virtio import constants as C
from harness.virtio import ctrl
from harness.virtio.misbehave import parse_list
from harness.virtio.net import CTRL_FEATURES, DEFAULT_FEATURES, MQ_FEATURES, VirtioNetDevice

RESET = DEFAULT_FEATURES | (1 << C.F_RING_RESET)
RX, TX = 0, 1


Rig = NetRig


def rig(features: int = RESET, driver_features: int | None = None) -> Rig:
    return net_rig(features=features, driver_features=driver_features, ledger=True)


def led(r: Rig) -> DmaLedger:
    assert r.ledger is not None
    return r.ledger


def read_q(r: Rig, index: int, off: int, width: int = 2) -> int:
    r.driver.write(C.COMMON_Q_SELECT, 2, index)
    return r.driver.read(off, width)


def hdr() -> bytes:
    return struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)


def violations(r: Rig) -> int:
    total = led(r).stats()["violations_total"]
    assert isinstance(total, int)
    return total


def test_ring_reset_is_offered_only_when_switched_on() -> None:
    assert rig().driver.device_features() >> C.F_RING_RESET & 1
    assert not rig(DEFAULT_FEATURES).driver.device_features() >> C.F_RING_RESET & 1


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_tx_reset_mid_traffic_unmaps_forgets_and_leaves_rx_alone(ring: str) -> None:
    r = rig(RESET | (1 << C.F_RING_PACKED) if ring == "packed" else RESET)
    d, dev = r.driver, r.device
    tx = d.queues[TX]
    tx.add([hdr() + b"sent"])
    tx.kick()
    dev.process()
    assert r.backend.tx == [hdr() + b"sent"]
    for i in range(3):  # made available and kicked, not yet taken by the device
        tx.add([hdr() + b"pending%d" % i])
    tx.kick()
    live, resets = led(r).live, dev.resets

    assert d.reset_queue(TX) == 0  # Linux polls queue_reset and queue_enable until 0
    assert led(r).live == live - 3  # the TX rings' three mappings are gone
    assert (read_q(r, TX, C.COMMON_Q_SIZE), read_q(r, TX, C.COMMON_Q_MSIX)) == (256, C.NO_VECTOR)
    for off in (C.COMMON_Q_DESCLO, C.COMMON_Q_AVAILLO, C.COMMON_Q_USEDLO):
        assert read_q(r, TX, off, 4) == 0
    dev.process()  # the kick from before the reset: nothing of that ring is executed
    assert r.backend.tx == [hdr() + b"sent"]
    assert dev.queue_resets == 1 and dev.bad_accesses == 0 and dev.resets == resets
    assert dev.status & C.STATUS_DRIVER_OK and not dev.status & C.STATUS_NEEDS_RESET

    # RX was not touched: still enabled, still mapped, still receiving.
    assert read_q(r, RX, C.COMMON_Q_ENABLE) == 1
    d.queues[RX].add(in_=[2048])
    d.queues[RX].kick()
    dev.process()
    r.backend.rx.append(hdr() + b"in")
    dev.on_backend_readable()
    assert [n for _, n in d.queues[RX].get_used()] == [len(hdr()) + 2]

    # Re-enabled with a smaller ring (ethtool -G): indices start from 0, traffic flows.
    size = 100 if ring == "packed" else 128  # a packed ring may take any size (2.8.10.1)
    tx2 = d.setup_queue(TX, size, vector=TX + 1)
    assert read_q(r, TX, C.COMMON_Q_ENABLE) == 1 and read_q(r, TX, C.COMMON_Q_RESET) == 0
    tx2.add([hdr() + b"after"])
    tx2.kick()
    dev.process()
    assert r.backend.tx[-1] == hdr() + b"after" and tx2.get_used() == [(0, 0)]
    assert dev.queues[TX].size == size
    d.reset()
    assert led(r).check_leaks("test end") == 0 and violations(r) == 0


def test_rx_reset_drops_its_buffers_and_the_frames_that_arrive_meanwhile() -> None:
    r = rig()
    d, dev = r.driver, r.device
    rx = d.queues[RX]
    for _ in range(8):
        rx.add(in_=[2048])
    rx.kick()
    dev.process()
    r.backend.rx.append(hdr() + b"one")
    dev.on_backend_readable()
    assert len(rx.get_used()) == 1
    live = led(r).live
    held = dev.queues[RX].outstanding  # chains the RX pool keeps mapped (HARNESS_RX_POOL)

    assert d.reset_queue(RX) == 0
    assert led(r).live == live - 3 - held and dev.queues[RX].outstanding == 0
    r.backend.rx.extend([hdr() + b"two", hdr() + b"three"])
    # Being reset: the frames are dropped (5.1.6.5.6.2: with every RX queue being reset the
    # device MUST drop), not held to arrive stale in the new ring.
    assert dev.rx_wanted()
    dev.on_backend_readable()
    assert not r.backend.rx and dev.reset_drops == 2 and dev.link_drops == 0
    assert dev.stats()["rx0"]["drops"] == 2  # type: ignore[index]

    rx2 = d.setup_queue(RX, 128, vector=RX + 1)
    rx2.add(in_=[2048])
    rx2.kick()
    dev.process()
    r.backend.rx.append(hdr() + b"four")
    assert dev.rx_wanted()
    dev.on_backend_readable()
    ((head, n),) = rx2.get_used()
    assert rx2.written(head, n)[len(hdr()):] == b"four" and dev.reset_drops == 2
    d.reset()
    assert led(r).check_leaks("test end") == 0 and violations(r) == 0


def test_a_reset_queue_is_not_executed_even_if_the_driver_kicks_it() -> None:
    r = rig()
    d, dev = r.driver, r.device
    tx = d.queues[TX]
    assert d.reset_queue(TX) == 0
    irqs = len(r.irq.vectors)
    tx.add([hdr() + b"stale ring"])  # the driver writes into the old ring and kicks anyway
    tx.kick()
    dev.process()
    assert r.backend.tx == [] and tx.used_idx() == 0
    assert len(r.irq.vectors) == irqs  # and it is not notified for it (2.6.1.1.1)


@pytest.mark.parametrize("case", ["not-negotiated", "select-out-of-range", "not-enabled",
                                  "value-0", "value-2"])
def test_bad_queue_reset_writes_are_ignored_and_counted(case: str) -> None:
    r = rig(driver_features=DEFAULT_FEATURES if case == "not-negotiated" else None)
    d, dev = r.driver, r.device
    queue = {"select-out-of-range": 7}.get(case, TX)
    if case == "not-enabled":
        assert d.reset_queue(TX) == 0
    before, live = dev.bad_accesses, led(r).live
    d.write(C.COMMON_Q_SELECT, 2, queue)
    d.write(C.COMMON_Q_RESET, 2, {"value-0": 0, "value-2": 2}.get(case, 1))
    assert dev.bad_accesses == before + 1
    assert d.read(C.COMMON_Q_RESET, 2) == 0
    assert led(r).live == live and dev.queue_resets == (1 if case == "not-enabled" else 0)
    if case != "not-enabled":  # the queue goes on working
        d.queues[TX].add([hdr() + b"still"])
        d.queues[TX].kick()
        dev.process()
        assert r.backend.tx == [hdr() + b"still"]
    assert not dev.status & C.STATUS_NEEDS_RESET


def test_queue_reset_with_a_wrong_width_is_a_bad_access() -> None:
    r = rig()
    r.driver.write(C.COMMON_Q_SELECT, 2, TX)
    r.driver.write(C.COMMON_Q_RESET, 4, 1)
    assert r.device.bad_accesses == 1 and read_q(r, TX, C.COMMON_Q_ENABLE) == 1


def test_device_reset_after_a_queue_reset_leaves_nothing_mapped() -> None:
    r = rig()
    assert r.driver.reset_queue(RX) == 0
    r.driver.reset()
    assert led(r).live == 0 and violations(r) == 0
    r.driver.init()  # and the device comes up again as new
    assert read_q(r, RX, C.COMMON_Q_ENABLE) == 1 and read_q(r, RX, C.COMMON_Q_RESET) == 0


def test_with_mq_a_reset_rx_queue_drops_its_frames_and_the_other_pair_goes_on() -> None:
    mem = MockMemory(8 << 20)
    ops, ledger = build_mapops("direct", mem.memory, bus_master=lambda: True)
    backends = [FakeBackend(), FakeBackend()]
    dev = VirtioNetDevice(ops, FakeIrq(), backends[0], mac=bytes(6), queue_size=64,
                          features=RESET | CTRL_FEATURES | MQ_FEATURES, max_pairs=2,
                          extra_backends=backends[1:], bus_master=lambda: True)
    d = MockDriver(dev, mem)
    d.init()
    cq = d.queues[4]
    head = cq.add([bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]), struct.pack("<H", 2)], in_=[1])
    cq.kick()
    dev.process()
    assert cq.get_used() == [(head, 1)] and dev.control.pairs == 2
    for rxq in (d.queues[0], d.queues[2]):
        rxq.add(in_=[2048])
        rxq.kick()
    dev.process()

    assert d.reset_queue(2) == 0  # rx1
    for b in backends:
        b.rx.append(hdr() + b"x")
    for pair in (0, 1):
        assert dev.rx_wanted(pair)
        dev.on_backend_readable(pair)
    assert len(d.queues[0].get_used()) == 1  # pair 0 untouched
    assert not backends[1].rx and dev.reset_drops == 1
    assert d.read(C.COMMON_Q_ENABLE, 2) == 0  # rx1 still selected
    d.reset()
    assert ledger is not None and ledger.check_leaks("test end") == 0


def test_a_frame_held_back_by_a_misbehaviour_goes_with_the_reset_ring() -> None:
    # used-out-of-order holds a TX completion back until the next one; the queue is reset in
    # between: the held element belongs to the old ring and must not land in the new one.
    r = rig()
    r.device.add_misbehaviour(parse_list("used-out-of-order:queue=tx0")[0])
    tx = r.driver.queues[TX]
    tx.add([hdr() + b"held"])
    tx.kick()
    r.device.process()
    assert tx.used_idx() == 0  # held back
    assert r.driver.reset_queue(TX) == 0
    tx2 = r.driver.setup_queue(TX, 64, vector=TX + 1)
    tx2.add([hdr() + b"new"])
    tx2.kick()
    r.device.process()
    # A frame is held only once: the new ring's first completion is its own, alone.
    assert tx2.get_used() == [(0, 0)]
