"""Multiqueue (VIRTIO_NET_F_MQ) with the driver-side mock: the queue layout of 5.1.2, the
config field, VQ_PAIRS_SET through the control queue (valid, refused, reset) and traffic on a
pair other than 0, each pair through its own backend; the ``mq=N`` feature switch."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from harness.dma import DirectMapOps, build_mapops
from harness.server.loop import DeviceLoop
from harness.testing.mockdriver import FakeBackend, FakeIrq, MockDriver, MockMemory, MockQueue
from harness.testing.serverfakes import FakeEndpoint, PolledBackend
from harness.virtio import constants as C
from harness.virtio import ctrl
from harness.virtio import features as F
from harness.virtio.net import CTRL_FEATURES, DEFAULT_FEATURES, MQ_FEATURES, VirtioNetDevice

MAC = bytes.fromhex("525400123456")
HDR = bytes(12)
MQ = DEFAULT_FEATURES | CTRL_FEATURES | MQ_FEATURES


class Rig:
    """A device with ``pairs`` queue pairs, one FakeBackend each, probed to DRIVER_OK."""

    def __init__(self, pairs: int = 4, driver_features: int | None = None,
                 backends: Sequence[FakeBackend] = ()) -> None:
        self.mem = MockMemory(8 << 20)
        self.backends = list(backends) or [FakeBackend() for _ in range(pairs)]
        self.told: list[int] = []
        self.device = VirtioNetDevice(
            DirectMapOps(self.mem.memory), FakeIrq(), self.backends[0], mac=MAC,
            queue_size=64, features=MQ, bus_master=lambda: True, max_pairs=pairs,
            extra_backends=self.backends[1:], on_pairs=self.told.append)
        self.driver = MockDriver(self.device, self.mem)
        self.driver.init(driver_features)

    def q(self, index: int) -> MockQueue:
        return self.driver.queues[index]

    def command(self, cmd: bytes) -> int:
        """One control command through the control queue (the last one); the ack byte."""
        q = self.driver.queues[-1]
        head = q.add([cmd[:2], cmd[2:]] if len(cmd) > 2 else [cmd], in_=[1])
        q.kick()
        self.device.process()
        [(h, n)] = q.get_used()
        assert h == head and n == 1
        return q.written(head, 1)[0]

    def pairs_set(self, n: int) -> int:
        return self.command(bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", n))


def frame(tag: int) -> bytes:
    return MAC + bytes([2, 0, 0, 0, 0, tag]) + b"\x08\x00" + bytes([tag]) * 50


@pytest.mark.parametrize("pairs", [1, 2, 4])
def test_queue_layout_and_config(pairs: int) -> None:
    r = Rig(pairs)
    d = r.device
    assert r.driver.read(C.COMMON_NUMQ, 2) == 2 * pairs + 1
    names = [q.name for q in d.queues]
    assert names == [f"{k}{i}" for i in range(pairs) for k in ("rx", "tx")] + ["ctrl"]
    assert r.driver.device_features() >> C.NET_F_MQ & 1
    # max_virtqueue_pairs: device config offset 8 (after mac and status).
    assert r.driver.read(C.DEVICE_OFFSET + 8, 2) == pairs
    assert d.control.pairs == 1 and d.stats()["pairs"] == {
        "max": pairs, "active": 1, "rx_starved": [False] * pairs}


def test_the_default_device_has_no_mq() -> None:
    assert F.DEFAULTS.mq is None and F.DEFAULTS.pairs == 1
    assert not F.DEFAULTS.bits >> C.NET_F_MQ & 1
    with pytest.raises(ValueError, match="max_pairs"):
        VirtioNetDevice(DirectMapOps(MockMemory().memory), FakeIrq(), FakeBackend(), mac=MAC,
                        bus_master=lambda: True, max_pairs=2, extra_backends=[FakeBackend()])


def test_vq_pairs_set_valid_enables_pairs_and_tells_the_owner() -> None:
    r = Rig(4)
    assert not r.device.rx_wanted(1)
    assert r.pairs_set(2) == ctrl.OK
    assert r.device.control.pairs == 2 and r.told == [2]
    assert r.device.stats()["ctrl"]["pairs_set"] == 2  # type: ignore[index]
    assert r.device.rx_wanted(1) and not r.device.rx_wanted(2)
    assert r.pairs_set(4) == ctrl.OK and r.told == [2, 4]


@pytest.mark.parametrize("bad", [
    bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 0),
    bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 5),
    bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 0xFFFF),
    bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET, 2]),
    bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<HH", 2, 2),
    bytes([ctrl.CLASS_MQ, 7]) + struct.pack("<H", 2),
])  # fmt: skip
def test_vq_pairs_set_invalid_is_err_and_changes_nothing(bad: bytes) -> None:
    r = Rig(4)
    assert r.pairs_set(3) == ctrl.OK
    assert r.command(bad) == ctrl.ERR
    assert r.device.control.pairs == 3 and r.told == [3]
    assert r.device.stats()["errors"] == 0  # refused, the queue and device stay healthy


def test_vq_pairs_set_without_mq_negotiated_is_err() -> None:
    r = Rig(4, driver_features=MQ & ~MQ_FEATURES)
    assert r.pairs_set(2) == ctrl.ERR and r.device.control.pairs == 1 and r.told == []


def test_traffic_on_pair_2_uses_backend_2_only_once_enabled() -> None:
    r = Rig(4)
    rx2, tx2 = r.q(4), r.q(5)
    for _ in range(4):
        rx2.add(in_=[2048])
    rx2.kick()
    r.device.process()
    r.backends[2].rx.append(HDR + frame(2))
    r.device.on_backend_readable(2)  # pair 2 not enabled: nothing may move (5.1.6.5.5)
    assert rx2.get_used() == [] and len(r.backends[2].rx) == 1
    assert r.pairs_set(3) == ctrl.OK
    r.device.on_backend_readable(2)
    [(head, n)] = rx2.get_used()
    assert rx2.written(head, n)[12:] == frame(2)
    tx2.add([HDR + frame(9)])
    tx2.kick()
    r.device.process()
    assert r.backends[2].tx == [HDR + frame(9)]
    assert all(not b.tx for i, b in enumerate(r.backends) if i != 2)
    st = r.device.stats()
    assert st["rx2"]["packets"] == 1 and st["tx2"]["packets"] == 1  # type: ignore[index]
    assert st["rx0"]["packets"] == 0 and st["tx0"]["packets"] == 0  # type: ignore[index]


def test_tx_on_an_inactive_pair_goes_out_through_pair_0() -> None:
    r = Rig(4)
    r.q(7).add([HDR + frame(3)])
    r.q(7).kick()
    r.device.process()
    assert r.backends[0].tx == [HDR + frame(3)] and not r.backends[3].tx


def test_reset_goes_back_to_one_pair() -> None:
    r = Rig(4)
    assert r.pairs_set(4) == ctrl.OK
    r.driver.reset()
    assert r.device.control.pairs == 1 and r.told == [4, 1]
    assert r.device.control.pairs_set == 4  # what the driver ran with, for the stats
    r.driver.init()
    assert not r.device.rx_wanted(3)


def test_malformed_chain_on_pair_2_breaks_only_that_queue() -> None:
    r = Rig(4)
    assert r.pairs_set(3) == ctrl.OK
    r.q(4).add([b"readable in an RX chain"], in_=[2048])
    r.q(4).kick()
    r.device.process()
    r.backends[2].rx.append(HDR + frame(2))
    r.device.on_backend_readable(2)
    assert r.device.queues[4].broken and r.device.stats()["needs_reset"]
    assert not any(q.broken for i, q in enumerate(r.device.queues) if i != 4)


@pytest.mark.parametrize(("text", "mq", "ctrl_vq"), [
    ("", None, False), ("mq=4", 4, True), ("mq=1", 1, True), ("mq=2,mq=off", None, False),
    ("mq=0", None, False),
    ("ctrl_vq=off,ctrl_vq=on,mq=2", 2, True),
])  # fmt: skip
def test_mq_switch(text: str, mq: int | None, ctrl_vq: bool) -> None:
    f = F.parse(text)
    assert f.mq == mq and ("ctrl_vq" in f.on) == ctrl_vq
    assert bool(f.bits >> C.NET_F_MQ & 1) == (mq is not None)
    assert F.parse(f.spec()) == f


@pytest.mark.parametrize(("text", "why"), [
    ("mq=5", "from 1 to 4"), ("mq=x", "from 1 to 4"),
    ("mq=on", "from 1 to 4"), ("ctrl_vq=off,mq=2", "needs ctrl_vq=on"),
    ("mq=2,ctrl_vq=off", "needs ctrl_vq=on"),
])  # fmt: skip
def test_mq_switch_errors_are_one_line(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as e:
        F.parse(text)
    assert "\n" not in str(e.value)


def test_the_loop_polls_the_backend_of_each_enabled_pair() -> None:
    backends = [PolledBackend() for _ in range(4)]
    r = Rig(4, backends=backends)
    _ops, ledger = build_mapops("direct", r.mem.memory, bus_master=lambda: True)
    assert ledger is not None
    endpoint = FakeEndpoint(attach_after=1)
    loop = DeviceLoop(endpoint, r.device, ledger, backends[0], extra_backends=backends[1:],
                      idle_timeout=0.0)
    try:
        def polled() -> set[int]:
            return {k.fd for k in loop.selector.get_map().values()} & {
                b.fileno() for b in backends}

        loop.turn()
        assert polled() == {backends[0].fileno()}
        assert r.pairs_set(2) == ctrl.OK
        rx1 = r.q(2)
        rx1.add(in_=[2048])
        rx1.kick()
        backends[1].rx.append(HDR + frame(1))
        loop.turn()  # polls backend 1 from now on and takes its waiting frame at once
        # Pair 1 polled; pair 0 (no RX buffers: starved) and pairs 2, 3 (off) are not.
        assert polled() == {backends[1].fileno()}
        [(head, n)] = rx1.get_used()
        assert rx1.written(head, n)[12:] == frame(1)
        r.driver.reset()
        loop.turn()
        assert polled() == set()
    finally:
        loop.close()
        endpoint.close()
        for b in backends:
            b.close()
