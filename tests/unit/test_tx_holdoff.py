"""HARNESS_TX_HOLDOFF_US: after a TX flush that drained a stream, the device leaves the
driver's kicks suppressed and looks at the ring again after the hold-off (VirtioNetDevice
.next_timer, woken by DeviceLoop) instead of asking for a kick; a lone request is never held.
"""

from __future__ import annotations

import struct

import pytest

from harness.testing.mockdriver import NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES
from harness.virtio.netdefs import TX_HOLDOFF_ENV, TX_HOLDOFF_MIN, tx_holdoff

NO_EVENT_IDX = DEFAULT_FEATURES & ~(1 << C.F_EVENT_IDX)


def hdr() -> bytes:
    return struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)


class Clock:
    """A frozen time.monotonic: holds fall due only when the test says so, however slow the
    machine (CI once saw a 200 us hold expire between two lines of a test)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rig(features: int = DEFAULT_FEATURES) -> tuple[NetRig, Clock]:
    r = net_rig(features=features)
    clock = Clock()
    r.device.timers.clock = clock
    return r, clock


def send(r: NetRig, n: int, seed: int = 0) -> None:
    """The driver adds ``n`` frames and kicks only if the device asks for it (Linux)."""
    for i in range(n):
        r.tx.add([hdr() + bytes([seed + i]) * 60])
    r.tx.kick_if_needed()


def expire(clock: Clock) -> None:
    """Make every hold-off due now (instead of sleeping)."""
    clock.now += 1.0


def test_the_switch_is_off_by_default_and_read_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TX_HOLDOFF_ENV, raising=False)
    assert tx_holdoff() == 0.0
    monkeypatch.setenv(TX_HOLDOFF_ENV, "50")
    assert tx_holdoff() == pytest.approx(50e-6)
    for bad in ("x", "-1", "20000", "1.5"):
        monkeypatch.setenv(TX_HOLDOFF_ENV, bad)
        with pytest.raises(ValueError, match=TX_HOLDOFF_ENV):
            tx_holdoff()


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, NO_EVENT_IDX], ids=["event-idx", "flags"])
def test_a_stream_is_held_off_and_taken_when_the_time_is_up(monkeypatch: pytest.MonkeyPatch,
                                                            features: int) -> None:
    monkeypatch.setenv(TX_HOLDOFF_ENV, "200")
    r, clock = rig(features=features)
    send(r, TX_HOLDOFF_MIN)
    r.device.process()
    assert len(r.backend.tx) == TX_HOLDOFF_MIN
    due = r.device.next_timer()
    assert due is not None and due - clock.now == pytest.approx(200e-6)
    # Held off: the driver's next frames ask for no kick, and nothing moves before the time.
    send(r, 3, seed=10)
    assert r.tx.kicked_at == r.tx.avail_idx and not r.device.has_work()
    r.device.process()
    assert len(r.backend.tx) == TX_HOLDOFF_MIN
    expire(clock)
    r.device.process()
    assert len(r.backend.tx) == TX_HOLDOFF_MIN + 3
    # Fewer than a stream's worth: no new hold, and the driver is asked for kicks again.
    assert r.device.next_timer() is None and r.device.stats()["tx_holdoffs"] == 1
    send(r, 1, seed=20)
    assert r.device.has_work()  # the driver kicked
    r.device.process()
    assert len(r.backend.tx) == TX_HOLDOFF_MIN + 4


def test_a_lone_request_is_never_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TX_HOLDOFF_ENV, "200")
    r, _clock = rig()
    for i in range(5):
        send(r, TX_HOLDOFF_MIN - 1, seed=i)
        assert r.device.has_work()  # each burst kicked
        r.device.process()
        assert r.device.next_timer() is None
    assert len(r.backend.tx) == 5 * (TX_HOLDOFF_MIN - 1)


def test_off_never_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TX_HOLDOFF_ENV, raising=False)
    r, _clock = rig()
    send(r, 32)
    r.device.process()
    assert r.device.next_timer() is None and "tx_holdoffs" not in r.device.stats()
    send(r, 1)
    assert r.device.has_work()


def test_resets_drop_the_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold must not outlive its ring: after a device reset the timer is gone (a loop
    waking for it forever would spin)."""
    monkeypatch.setenv(TX_HOLDOFF_ENV, "200")
    r, _clock = rig()
    send(r, TX_HOLDOFF_MIN)
    r.device.process()
    assert r.device.next_timer() is not None
    r.driver.reset()
    assert r.device.next_timer() is None


def test_a_due_hold_without_dma_is_kept_as_a_kick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bus Master Enable cleared during a hold: the ring is not touched, the hold becomes a
    pending kick served once DMA is allowed again (and the timer does not stay due)."""
    monkeypatch.setenv(TX_HOLDOFF_ENV, "200")
    r, clock = rig()
    send(r, TX_HOLDOFF_MIN)
    r.device.process()
    assert r.device.next_timer() is not None
    send(r, 2, seed=50)
    r.bus_master[0] = False
    expire(clock)
    r.device.process()
    assert r.device.next_timer() is None and len(r.backend.tx) == TX_HOLDOFF_MIN
    r.bus_master[0] = True
    assert r.device.has_work()
    r.device.process()
    assert len(r.backend.tx) == TX_HOLDOFF_MIN + 2
