"""HARNESS_IRQ_AT=idle (harness.server.irqdefer): the loop raises the device's interrupts after
one more round without sleeping, together, and never holds one across a sleep; a reset drops
what is queued; the default raises every interrupt at once."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from harness.server import switches
from harness.server.irqdefer import IRQ_AT_ENV, DeferredIrq, irq_at_idle
from harness.server.loop import DeviceLoop
from harness.testing.fakeio import FakeIrq
from harness.testing.mockdriver import FdBackend, NetRig, net_rig
from harness.testing.serverfakes import FakeEndpoint

HDR = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)


def test_the_sink_queues_each_vector_once_in_order_until_flushed() -> None:
    inner = FakeIrq()
    d = DeferredIrq(inner)
    assert not d.pending
    for v in (2, 1, 2, 0):
        d.trigger(v)
    assert inner.vectors == [] and d.pending
    d.flush()
    assert inner.vectors == [2, 1, 0] and not d.pending
    assert (d.flushed, d.coalesced) == (3, 1)
    d.trigger(5)
    d.drop()
    d.flush()
    assert inner.vectors == [2, 1, 0]


def test_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(IRQ_AT_ENV, raising=False)
    assert irq_at_idle() is False  # the default: at once
    monkeypatch.setenv(IRQ_AT_ENV, "idle")
    assert irq_at_idle() is True
    monkeypatch.setenv(IRQ_AT_ENV, "later")
    with pytest.raises(ValueError):
        irq_at_idle()
    assert switches.READERS[IRQ_AT_ENV] is irq_at_idle


class _Bell(FakeEndpoint):
    """The vfio-user socket: every byte received is one TX doorbell."""

    def __init__(self, rig: NetRig) -> None:
        super().__init__()
        self.rig = rig

    def run(self) -> int:
        n = super().run()
        for _ in range(n):
            self.rig.tx.kick()
        return n


class _Rig:
    def __init__(self, defer: bool) -> None:
        self.tap = FdBackend()
        self.rig = net_rig(mem_size=8 << 20, ledger=True, backend=self.tap, bursts=True)
        self.inner = self.rig.irq
        self.defer = DeferredIrq(self.inner) if defer else None
        if self.defer is not None:
            self.rig.device.irq = self.defer
        self.bell = _Bell(self.rig)
        assert self.rig.ledger is not None
        self.loop = DeviceLoop(self.bell, self.rig.device, self.rig.ledger, self.tap,
                               idle_timeout=0.05, irq_defer=self.defer)
        #: (timeout, interrupts queued) of every dispatch
        self.waits: list[tuple[float, bool]] = []
        real = self.loop.dispatch

        def dispatch(timeout: float) -> None:
            self.waits.append((timeout, self.defer is not None and self.defer.pending))
            real(timeout)
        self.loop.dispatch = dispatch  # type: ignore[method-assign]
        self.bell.attach()
        self.loop.connected()
        for _ in range(8):
            self.rig.rx.add(in_=[1526])
        self.rig.rx.kick()
        self.loop.run_once()
        for _ in range(3):
            self.loop.run_once()  # whatever set-up raised, out
        self.inner.vectors.clear()
        self.waits.clear()

    def send(self) -> None:
        """The driver reaps what was used, then sends one frame and kicks, wanting an
        interrupt for its completion and for the next RX frame (as Linux while nothing is
        outstanding)."""
        r = self.rig
        for _ in r.tx.get_used():
            pass
        for _ in r.rx.get_used():
            r.rx.add(in_=[1526])
        r.rx.kick_if_needed()
        r.tx.set_used_event(r.tx.last_used)
        r.rx.set_used_event(r.rx.last_used)
        r.tx.add([HDR + bytes(60)])
        self.bell.peer.send(b"k")

    def reply(self) -> None:
        """The host's answer lands in the TAP."""
        self.tap.deliver(HDR + self.rig.device.mac + bytes(60))

    def close(self) -> None:
        self.loop.close()
        self.tap.close()
        self.bell.close()


@pytest.fixture
def deferred() -> Iterator[_Rig]:
    rig = _Rig(defer=True)
    yield rig
    rig.close()


def _vectors(rig: _Rig) -> tuple[int, int]:
    return rig.rig.device.queues[1].msix_vector, rig.rig.device.queues[0].msix_vector


def test_a_reply_already_waiting_goes_out_with_the_tx_interrupt(deferred: _Rig) -> None:
    tx, rx = _vectors(deferred)
    deferred.send()
    deferred.loop.run_once()  # the doorbell: TX done, its interrupt queued
    assert deferred.inner.vectors == []
    assert deferred.rig.device.queues[1].stats.packets == 1
    deferred.reply()  # a ping's: the host answered inside our write
    deferred.loop.run_once()  # one more look without sleeping: the reply, RX queued
    assert deferred.inner.vectors == []
    assert deferred.rig.device.queues[0].stats.packets == 1
    deferred.loop.run_once()  # both raised, together, before the loop may sleep
    assert deferred.inner.vectors == [tx, rx]
    assert [t for t, _ in deferred.waits] == [0.05, 0.0, 0.05]


def test_no_interrupt_is_held_across_a_sleep(deferred: _Rig) -> None:
    tx, rx = _vectors(deferred)
    for when in (0, 1, 2, 3, None, 1):  # the reply after that many rounds (None: no reply)
        deferred.send()
        for k in range(4):
            if k == when:
                deferred.reply()
            deferred.loop.run_once()
    assert deferred.waits and not any(t > 0 and queued for t, queued in deferred.waits)
    assert deferred.inner.vectors.count(tx) == 6
    assert deferred.inner.vectors.count(rx) == 5
    assert deferred.defer is not None and not deferred.defer.pending


def test_a_reset_drops_what_is_queued(deferred: _Rig) -> None:
    deferred.send()
    deferred.loop.run_once()
    assert deferred.defer is not None and deferred.defer.pending
    deferred.rig.device.after_reset()
    assert not deferred.defer.pending
    deferred.loop.run_once()
    deferred.loop.run_once()
    assert deferred.inner.vectors == []


def test_the_default_raises_each_interrupt_in_the_round_that_made_it() -> None:
    rig = _Rig(defer=False)
    try:
        tx, rx = _vectors(rig)
        rig.send()
        rig.loop.run_once()
        assert rig.inner.vectors == [tx]
        rig.reply()
        rig.loop.run_once()
        assert rig.inner.vectors == [tx, rx]
    finally:
        rig.close()
