"""Fault injection: spec parsing, and full mock-driver traffic under every fault at once."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from harness.dma import BounceMapOps, DmaLedger, FaultInjectingMapOps, FaultSpec, build_mapops
from harness.server.loop import DeviceLoop
from harness.testing.mockdriver import FakeIrq, MockDriver, MockMemory, MockQueue
from harness.testing.serverfakes import FakeEndpoint, PolledBackend
from harness.virtio import constants as C
from harness.virtio.net import VirtioNetDevice


def test_parse_full_spec() -> None:
    s = FaultSpec.parse("mapping-error=0.01, iova_alloc=0.05,max-mapping-size=4k,seed=7")
    assert s == FaultSpec(mapping_error=0.01, iova_alloc=0.05, max_mapping_size=4096, seed=7)
    assert s.active
    assert FaultSpec.parse(str(s)) == s
    assert FaultSpec.parse("") == FaultSpec() and not FaultSpec().active
    assert FaultSpec.parse("max-mapping-size=0x800").max_mapping_size == 2048


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mapping-error", "not key=value"),
        ("mapping-error=", "not key=value"),
        ("mapping-error=lots", "not a number"),
        ("mapping-error=1.5", "in [0, 1]"),
        ("iova-alloc=-0.1", "in [0, 1]"),
        ("max-mapping-size=big", "not an integer"),
        ("max-mapping-size=0", "at least 1"),
        ("seed=x", "not an integer"),
        ("seed=1,seed=2", "given twice"),
        ("dma-explodes=1", "unknown fault 'dma-explodes'"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FaultSpec.parse(text)


def test_unknown_mapops_kind() -> None:
    with pytest.raises(ValueError, match="unknown map ops"):
        build_mapops("iommu", MockMemory().memory, bus_master=lambda: True)


# ---- traffic under faults --------------------------------------------------------------------

HDR_TX = bytes(12)
HDR_RX = bytes(10) + b"\x01\x00"  # num_buffers = 1, as the device writes it
SPEC = "mapping-error=0.2,iova-alloc=0.2,max-mapping-size=2048,seed=11"


class Rig:
    """The device over a mock driver, served by the real DeviceLoop (fakes only at its edges)."""

    def __init__(self, kind: str, spec: FaultSpec) -> None:
        self.kind = kind
        self.mem = MockMemory(64 << 20)
        self.backend = PolledBackend()
        self.irq = FakeIrq()
        ops, ledger = build_mapops(kind, self.mem.memory, bus_master=lambda: True, faults=spec)
        assert isinstance(ledger, DmaLedger)
        self.ops = ops
        self.ledger = ledger
        self.dev = VirtioNetDevice(
            ops, self.irq, self.backend, mac=bytes(6), queue_size=64, bus_master=lambda: True
        )
        self.driver = MockDriver(self.dev, self.mem)
        self.driver.init()
        # Built after the probe: the probe's reset and queue set-up happen with no loop turn in
        # between, which the loop's per-turn leak check cannot tell apart from a leak (see
        # test_loop.py::test_reset_and_reinit_in_one_round_is_not_a_leak).
        self.endpoint = FakeEndpoint()
        self.loop = DeviceLoop(self.endpoint, self.dev, ledger, self.backend, idle_timeout=0.0)

    def turn(self) -> None:
        """One server loop turn, the loop's own code: select, dispatch, per-turn work."""
        self.loop.run_once()

    def close(self) -> None:
        self.loop.close()
        self.endpoint.close()
        self.backend.close()


@pytest.fixture(params=["direct", "bounce"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(str(request.param), FaultSpec.parse(SPEC))
    yield r
    r.close()


def _tx(rig: Rig, frames: list[bytes]) -> None:
    tx: MockQueue = rig.driver.queues[1]
    sent = 0
    done = 0
    for _ in range(20000):
        while sent < len(frames) and len(tx.free) >= 2:
            f = frames[sent]
            tx.add([f[:12], f[12:]])
            sent += 1
        tx.kick_if_needed()
        rig.turn()
        done += len(tx.get_used())
        if done == len(frames):
            return
    raise AssertionError(f"TX stalled: {done}/{len(frames)} completed")


def _rx(rig: Rig, frames: list[bytes], bufsize: int) -> list[bytes]:
    rx: MockQueue = rig.driver.queues[0]
    rig.backend.rx.extend(frames)
    got: list[bytes] = []
    for _ in range(20000):
        while rx.free:
            rx.add(in_=[bufsize], publish=True)
        rx.kick_if_needed()
        rig.turn()
        for head, n in rx.get_used():
            got.append(rx.written(head, n))
        if len(got) == len(frames):
            return got
    raise AssertionError(f"RX stalled: {len(got)}/{len(frames)} delivered")


def test_traffic_survives_every_fault(rig: Rig) -> None:
    kind = rig.kind
    rnd = random.Random(5)
    tx_frames = [HDR_TX + rnd.randbytes(rnd.randrange(60, 6000)) for _ in range(300)]
    _tx(rig, tx_frames)
    assert rig.backend.tx == tx_frames  # all of them, in order, byte-exact
    rx_frames = [HDR_RX + rnd.randbytes(rnd.randrange(60, 1514)) for _ in range(300)]
    got = _rx(rig, rx_frames, bufsize=4096)  # 4 KiB buffers: two mappings each at 2048
    assert got == rx_frames
    dev = rig.dev
    assert not dev.status & C.STATUS_NEEDS_RESET and dev.stats()["errors"] == 0
    led = rig.ledger
    s = led.stats()
    assert s["violations_total"] == 0, s["violations"]
    faults = s["faults"]
    assert isinstance(faults, dict)
    assert faults["injected"]["mapping_error"] > 50
    totals = dev.stats()["totals"]
    assert isinstance(totals, dict) and totals["map_errors"] > 0  # seen and retried
    assert led.failed_maps >= faults["injected"]["mapping_error"]
    if kind == "bounce":
        fi = led.inner
        assert isinstance(fi, FaultInjectingMapOps)
        bounce = fi.inner
        assert isinstance(bounce, BounceMapOps)
        assert faults["injected"]["iova_alloc"]["insert"] > 0
        assert bounce.domain.stats["deferred"] > 0  # the deferred-erase path ran
        assert bounce.alloc_failures > 0
    # Rings stay mapped while the queues run; a reset returns every mapping.
    assert led.live == 6
    rig.driver.reset()
    rig.turn()  # the loop sees the reset and checks for leaks
    assert led.live == 0
    s = led.stats()
    assert s["violations_total"] == 0, s["violations"]
    if kind == "bounce":
        assert isinstance(bounce, BounceMapOps)
        for _ in range(50):
            if not bounce.domain.deferred:
                break
            rig.turn()  # housekeeping retries the deferred erases
        bounce.domain.flush_rcaches()
        for _ in range(50):
            rig.turn()
        assert bounce.live_slots == 0
        bounce.domain.check()


def test_settle_finishes_the_deferred_erases_a_reset_left() -> None:
    """At exit (assembly.final_stats) the last reset's erases may fail and be deferred with no
    loop turn left to retry them: DmaLedger.settle must finish them."""
    r = Rig("bounce", FaultSpec.parse("iova-alloc=0.5,seed=3"))
    try:
        _tx(r, [HDR_TX + bytes([i]) * 200 for i in range(40)])
        r.driver.reset()  # the device releases its slots; no loop turn after it
        fi = r.ledger.inner
        assert isinstance(fi, FaultInjectingMapOps) and isinstance(fi.inner, BounceMapOps)
        domain = fi.inner.domain
        assert domain.deferred, "the reset deferred nothing: the test proves nothing"
        r.ledger.settle()
        assert not domain.deferred
    finally:
        r.close()


def test_faults_off_means_no_wrapper() -> None:
    ops, ledger = build_mapops("bounce", MockMemory().memory, bus_master=lambda: True)
    assert ledger is ops and isinstance(ledger, DmaLedger)
    assert isinstance(ledger.inner, BounceMapOps)
    raw, none = build_mapops("direct", MockMemory().memory, bus_master=lambda: True, ledger=False)
    assert none is None and raw.max_mapping_size() == 1 << 32
