"""HARNESS_TX_IRQ_DELAY_US: a TX interrupt the driver wants is raised later, and only if the
driver still wants it then (harness.virtio.nettimers): a driver that took the used buffers
meanwhile (Linux's RX poll cleaning TX) and moved used_event on, or set NO_INTERRUPT, gets
none; one that still waits gets exactly one. Resets drop the timer; without DMA it waits.
"""

from __future__ import annotations

import struct
import time

import pytest

from harness.testing.mockdriver import NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES
from harness.virtio.netdefs import TX_IRQ_DELAY_ENV, tx_irq_delay

NO_EVENT_IDX = DEFAULT_FEATURES & ~(1 << C.F_EVENT_IDX)


def send(r: NetRig, n: int = 1, seed: int = 0) -> None:
    hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)
    for i in range(n):
        r.tx.add([hdr + bytes([seed + i]) * 60])
    r.tx.kick_if_needed()


def tx_irqs(r: NetRig) -> int:
    return r.irq.count(r.device.queues[1].msix_vector)


def expire(r: NetRig) -> None:
    """Make every deferred interrupt due now (instead of sleeping)."""
    r.device.timers.irq = [t and time.monotonic() - 1e-6 for t in r.device.timers.irq]


def wants_every_completion(r: NetRig, features: int) -> None:
    """The driver asks for an interrupt at the next used entry (Linux after its poll)."""
    if features & 1 << C.F_EVENT_IDX:
        r.tx.set_used_event(r.tx.last_used)
    else:
        r.tx.set_avail_flags(0)


@pytest.fixture
def delayed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TX_IRQ_DELAY_ENV, "300")


def test_the_switch_is_off_by_default_and_read_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TX_IRQ_DELAY_ENV, raising=False)
    assert tx_irq_delay() == 0.0
    r = net_rig()
    wants_every_completion(r, DEFAULT_FEATURES)
    send(r)
    r.device.process()
    assert tx_irqs(r) == 1 and r.device.next_timer() is None
    assert "tx_irqs_deferred" not in r.device.stats()
    monkeypatch.setenv(TX_IRQ_DELAY_ENV, "150")
    assert tx_irq_delay() == pytest.approx(150e-6)
    for bad in ("x", "-1", "20000", "1.5"):
        monkeypatch.setenv(TX_IRQ_DELAY_ENV, bad)
        with pytest.raises(ValueError, match=TX_IRQ_DELAY_ENV):
            tx_irq_delay()


@pytest.mark.usefixtures("delayed")
@pytest.mark.parametrize("features", [DEFAULT_FEATURES, NO_EVENT_IDX], ids=["event-idx", "flags"])
def test_a_driver_still_waiting_gets_one_interrupt_when_due(features: int) -> None:
    r = net_rig(features=features)
    wants_every_completion(r, features)
    send(r)
    r.device.process()
    assert len(r.backend.tx) == 1 and r.tx.used_idx() == 1  # completed at once,
    assert tx_irqs(r) == 0  # but not told yet
    due = r.device.next_timer()
    assert due is not None and 0 < due - time.monotonic() <= 300e-6
    # A second completion while deferred: still one timer, one interrupt for both.
    send(r, seed=5)
    r.device.process()
    assert r.tx.used_idx() == 2 and r.device.next_timer() == due
    r.device.process()  # not due yet
    assert tx_irqs(r) == 0
    expire(r)
    r.device.process()
    assert tx_irqs(r) == 1 and r.device.next_timer() is None
    s = r.device.stats()
    assert (s["tx_irqs_deferred"], s["tx_irqs_saved"], s["tx_irq_delay_us"]) == (1, 0, 300)


@pytest.mark.usefixtures("delayed")
@pytest.mark.parametrize("features", [DEFAULT_FEATURES, NO_EVENT_IDX], ids=["event-idx", "flags"])
def test_a_driver_that_took_the_buffers_meanwhile_gets_none(features: int) -> None:
    r = net_rig(features=features)
    wants_every_completion(r, features)
    send(r)
    r.device.process()
    # The driver's RX poll cleans TX: it takes the used entry and moves its event past it
    # (or, without EVENT_IDX, is polling with NO_INTERRUPT set).
    assert len(r.tx.get_used()) == 1
    if features & 1 << C.F_EVENT_IDX:
        r.tx.set_used_event(r.tx.last_used)
    else:
        r.tx.set_avail_flags(C.AVAIL_F_NO_INTERRUPT)
    expire(r)
    r.device.process()
    assert tx_irqs(r) == 0 and r.device.next_timer() is None
    assert r.device.stats()["tx_irqs_saved"] == 1
    # The next completion is wanted again: deferred, then raised.
    wants_every_completion(r, features)
    send(r, seed=9)
    r.device.process()
    expire(r)
    r.device.process()
    assert tx_irqs(r) == 1


@pytest.mark.usefixtures("delayed")
def test_no_interrupt_deferred_when_none_is_wanted() -> None:
    r = net_rig()
    r.tx.set_used_event(r.tx.last_used + 100)  # Linux's enable_cb_delayed: later, please
    send(r)
    r.device.process()
    assert r.device.next_timer() is None and "tx_irqs_deferred" in r.device.stats()
    assert r.device.stats()["tx_irqs_deferred"] == 0


@pytest.mark.usefixtures("delayed")
def test_resets_drop_the_deferred_interrupt() -> None:
    """Neither a device reset nor a TX queue reset may leave a timer for a ring that is gone
    (a loop waking for it forever would spin; an interrupt for a reset ring is wrong)."""
    r = net_rig()
    wants_every_completion(r, DEFAULT_FEATURES)
    send(r)
    r.device.process()
    assert r.device.next_timer() is not None
    r.driver.reset()
    assert r.device.next_timer() is None


@pytest.mark.usefixtures("delayed")
def test_a_due_interrupt_without_dma_waits_for_it() -> None:
    """Bus Master Enable cleared before the time: no MSI while the function may not master
    the bus, and no timer left in the past for the loop to spin on; the interrupt comes once
    DMA is allowed again."""
    r = net_rig()
    wants_every_completion(r, DEFAULT_FEATURES)
    send(r)
    r.device.process()
    r.bus_master[0] = False
    expire(r)
    r.device.process()
    assert tx_irqs(r) == 0 and r.device.next_timer() is None
    r.bus_master[0] = True
    r.device.process()
    assert tx_irqs(r) == 1 and r.device.next_timer() is None
