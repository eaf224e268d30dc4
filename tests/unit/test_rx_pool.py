"""The RX pool (harness.virtio.rxpool, HARNESS_RX_POOL=keep|call): RX chains gathered for a
64 KiB frame and not used by it stay mapped across readable events, and every state change
that must not find them held (device reset, queue reset, guest memory going away, a pair made
inactive) gives them back or unmaps them, so the DMA ledger balances.

Driven through BAR0 by harness.testing.mockdriver (split) and mockpacked (packed), over a DMA
ledger; the device reads HARNESS_RX_POOL when it is built, so each test sets it first.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from harness.dma import DmaLedger
from harness.dma.factory import build_mapops
from harness.testing.mockdriver import FakeBackend, FakeIrq, MockDriver, MockMemory, MockQueue
from harness.virtio import constants as C
from harness.virtio import ctrl
from harness.virtio.net import (
    CTRL_FEATURES,
    DEFAULT_FEATURES,
    MQ_FEATURES,
    OFFLOAD_FEATURES,
    VirtioNetDevice,
)
from harness.virtio.rxpool import RX_POOL_ENV, rx_pool_keep

RX = 0
# Guest GSO: the device gathers room for a 64 KiB frame (129 buffers of 512) before a read;
# frames without a GSO header are at most 1514 bytes (3 buffers).
GSO = DEFAULT_FEATURES | OFFLOAD_FEATURES | (1 << C.F_RING_RESET)
FORMATS = {"split": GSO, "packed": GSO | (1 << C.F_RING_PACKED)}
BUF = 512
POSTED = 160


@dataclass
class Rig:
    device: VirtioNetDevice
    driver: MockDriver
    backend: FakeBackend
    ledger: DmaLedger

    @property
    def rx(self) -> MockQueue:
        return self.driver.queues[RX]

    def post(self, n: int = POSTED) -> None:
        for _ in range(n):
            self.rx.add(in_=[BUF])
        self.rx.kick()
        self.device.process()

    def receive(self, *frames: bytes) -> list[tuple[int, int]]:
        self.backend.rx.extend(frames)
        self.device.on_backend_readable()
        return self.rx.get_used()

    def num_buffers(self, head: int) -> int:
        hdr = self.rx.written(head, C.NET_HDR_SIZE)
        return int(struct.unpack_from("<H", hdr, C.NET_HDR_NUM_BUFFERS_OFFSET)[0])

    def violations(self) -> int:
        total = self.ledger.stats()["violations_total"]
        assert isinstance(total, int)
        return total


def rig(monkeypatch: pytest.MonkeyPatch, mode: str, features: int = GSO) -> Rig:
    monkeypatch.setenv(RX_POOL_ENV, mode)
    mem = MockMemory()
    ops, ledger = build_mapops("direct", mem.memory, bus_master=lambda: True)
    assert ledger is not None
    backend = FakeBackend()
    dev = VirtioNetDevice(ops, FakeIrq(), backend, mac=bytes(6), queue_size=256,
                          features=features, bus_master=lambda: True)
    driver = MockDriver(dev, mem)
    driver.init(features)
    return Rig(dev, driver, backend, ledger)


def frame(n: int, seed: int) -> bytes:
    """A vnet header (all zero: no offload) and ``n`` bytes of Ethernet frame."""
    return bytes(C.NET_HDR_SIZE) + bytes((seed + i) & 0xFF for i in range(n))


def test_mode_switch_is_read_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RX_POOL_ENV, raising=False)
    assert rx_pool_keep()
    monkeypatch.setenv(RX_POOL_ENV, "call")
    assert not rx_pool_keep()
    monkeypatch.setenv(RX_POOL_ENV, "kept")
    with pytest.raises(ValueError, match="expected keep or call"):
        rx_pool_keep()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["keep", "call"])
def test_frames_land_across_calls_with_num_buffers(monkeypatch: pytest.MonkeyPatch, fmt: str,
                                                   mode: str) -> None:
    r = rig(monkeypatch, mode, FORMATS[fmt])
    r.post()
    sent = [frame(54, 1), frame(1000, 2), frame(60, 3), frame(1514, 4), frame(1400, 5)]
    used: list[tuple[int, int]] = []
    for f in sent[:2]:  # one readable event each, then three in one event
        used += r.receive(f)
    used += r.receive(*sent[2:])
    # Each frame: its chains in ring order, the first one's header saying how many.
    k = 0
    for f in sent:
        head = used[k][0]
        n = r.num_buffers(head)
        assert n == -(-len(f) // BUF)
        got = b"".join(r.rx.written(h, ln) for h, ln in used[k : k + n])
        assert got[C.NET_HDR_SIZE:] == f[C.NET_HDR_SIZE:]
        assert sum(ln for _, ln in used[k : k + n]) == len(f)
        k += n
    assert k == len(used)
    assert r.device.stats()["rx0"]["packets"] == len(sent)  # type: ignore[index]
    assert r.violations() == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_keep_holds_the_room_and_maps_only_what_frames_use(monkeypatch: pytest.MonkeyPatch,
                                                          fmt: str) -> None:
    r = rig(monkeypatch, "keep", FORMATS[fmt])
    r.post()
    r.receive(frame(54, 1))
    q = r.device.queues[RX]
    held = q.outstanding
    assert held * BUF >= 65535  # room for a 64 KiB frame stays popped and mapped
    maps = r.ledger.maps
    for i in range(5):
        assert len(r.receive(frame(54, i))) == 1
    # One new chain mapped per one-buffer frame (the top-up), nothing given back and re-mapped.
    assert r.ledger.maps - maps == 5 and q.outstanding == held
    # dump-queue and stats show the held chains as what they are: popped, in flight.
    dump = r.device.dump_queue(RX)
    if fmt == "split":
        assert [c["state"] for c in dump["in_flight"]].count("popped") == held
    else:
        assert len(dump["device"]["popped"]) == held
    st = r.device.stats()
    assert st["rx0"]["outstanding"] == held  # type: ignore[index]
    assert st["rx_pool"] == "keep" and st["rx_pool_held"] == [held]


def test_call_gives_every_unused_chain_back(monkeypatch: pytest.MonkeyPatch) -> None:
    r = rig(monkeypatch, "call")
    r.post()
    live = r.ledger.live
    r.receive(frame(54, 1))
    assert r.device.queues[RX].outstanding == 0 and r.ledger.live == live
    st = r.device.stats()
    assert st["rx_pool"] == "call" and st["rx_pool_held"] == [0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_device_reset_unmaps_the_pool_and_the_ring_restarts(monkeypatch: pytest.MonkeyPatch,
                                                            fmt: str) -> None:
    r = rig(monkeypatch, "keep", FORMATS[fmt])
    r.post()
    r.receive(frame(54, 1))
    assert r.device.queues[RX].outstanding > 128
    r.driver.reset()
    assert r.ledger.live == 0 and r.ledger.check_leaks("reset") == 0 and r.violations() == 0
    r.driver.init(FORMATS[fmt])
    r.post(POSTED)
    used = r.receive(frame(100, 7))
    assert len(used) == 1 and r.num_buffers(used[0][0]) == 1
    assert r.rx.written(used[0][0], used[0][1])[C.NET_HDR_SIZE:] == frame(100, 7)[12:]
    r.driver.reset()
    assert r.ledger.live == 0 and r.violations() == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_queue_reset_unmaps_the_pool_and_the_ring_restarts(monkeypatch: pytest.MonkeyPatch,
                                                           fmt: str) -> None:
    r = rig(monkeypatch, "keep", FORMATS[fmt])
    r.post()
    r.receive(frame(54, 1))
    live = r.ledger.live
    held = r.device.queues[RX].outstanding
    assert held > 128
    assert r.driver.reset_queue(RX) == 0
    assert r.ledger.live == live - 3 - held  # its rings and every pooled chain
    assert r.device.queues[RX].outstanding == 0
    r.driver.setup_queue(RX, 256, vector=RX + 1)
    r.post()
    used = r.receive(frame(1000, 9))
    assert len(used) == 2 and r.num_buffers(used[0][0]) == 2
    r.driver.reset()
    assert r.ledger.live == 0 and r.ledger.check_leaks("end") == 0 and r.violations() == 0


def test_memory_going_away_under_the_pool_gives_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    r = rig(monkeypatch, "keep")
    r.post()
    r.receive(frame(54, 1))
    assert r.device.queues[RX].outstanding > 128
    mem = r.driver.mem
    r.device.dma_unmapped(mem.base, mem.size)  # what the vfu DMA unregister callback calls
    assert r.device.queues[RX].outstanding == 0 and r.ledger.live == 0
    # The same memory mapped again (unmap + map of a region): the chains are available again.
    assert len(r.receive(frame(54, 2))) == 1
    r.driver.reset()
    assert r.ledger.check_leaks("end") == 0 and r.violations() == 0


def test_memory_elsewhere_leaves_the_pool_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    r = rig(monkeypatch, "keep")
    r.post()
    r.receive(frame(54, 1))
    held = r.device.queues[RX].outstanding
    r.device.dma_unmapped(1 << 40, 4096)
    assert r.device.queues[RX].outstanding == held


def scenario(r: Rig) -> dict[str, object]:
    """Starve, refill, starve again: the counters a user sees."""
    r.post(4)  # 2 KiB: no room for a 64 KiB frame, and the ring could hold more
    r.receive(frame(54, 1))
    starved = r.device.stats()["rx_starved"]
    r.post(POSTED)
    n = len(r.receive(frame(54, 2), frame(1000, 3)))
    for _ in range(60):  # use the posted buffers up (3 a frame): starved again
        r.receive(frame(1514, 4))
    st = r.device.stats()["rx0"]
    assert isinstance(st, dict)
    return {"starved_first": starved, "used": n, "no_buffers": st["no_buffers"],
            "packets": st["packets"], "chains": st["chains"], "starved": r.device._rx_starved,
            "backlog": len(r.backend.rx)}


def test_no_buffers_counting_is_the_same_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    keep = scenario(rig(monkeypatch, "keep"))
    call = scenario(rig(monkeypatch, "call"))
    assert keep == call, (keep, call)
    assert keep["starved_first"] is True and keep["used"] == 4 and keep["no_buffers"] == 2


def test_a_pair_made_inactive_gets_its_held_chains_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RX_POOL_ENV, "keep")
    mem = MockMemory(8 << 20)
    ops, ledger = build_mapops("direct", mem.memory, bus_master=lambda: True)
    backends = [FakeBackend(), FakeBackend()]
    mac = bytes([2, 0, 0, 0, 0, 1])
    feats = DEFAULT_FEATURES | CTRL_FEATURES | MQ_FEATURES
    dev = VirtioNetDevice(ops, FakeIrq(), backends[0], mac=mac, queue_size=64, features=feats,
                          bus_master=lambda: True, max_pairs=2, extra_backends=backends[1:])
    d = MockDriver(dev, mem)
    d.init(feats)
    ctrlq = d.queues[-1]
    ctrlq.add([bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]), struct.pack("<H", 2)], in_=[1])
    ctrlq.kick()
    dev.process()
    rx1 = d.queues[2]
    for _ in range(4):
        rx1.add(in_=[2048])
    rx1.kick()
    dev.process()
    backends[1].rx.append(bytes(C.NET_HDR_SIZE) + mac + bytes(6) + b"\x08\x00" + bytes(50))
    dev.on_backend_readable(1)
    assert len(rx1.get_used()) == 1 and dev.queues[2].outstanding == 1  # the next frame's room
    ctrlq.add([bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]), struct.pack("<H", 1)], in_=[1])
    ctrlq.kick()
    dev.process()
    assert dev.control.pairs == 1 and dev.queues[2].outstanding == 0
    states = [c["state"] for c in dev.dump_queue(2)["in_flight"]]
    assert states == ["available"] * 3
    d.reset()
    assert ledger is not None and ledger.live == 0 and ledger.check_leaks("end") == 0
