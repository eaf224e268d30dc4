"""Interrupts raised when the loop is about to sleep (``HARNESS_IRQ_AT=idle``), not at once.

Each interrupt our device raises is an eventfd write that QEMU's main loop must wake up for,
inject, and go back to sleep; the vCPU it lands on may have to wake too. A ping makes two in
one wake-up of the server: the TX completion's, then, once the host's reply is read from the
TAP, the RX one, some 200 us apart as QEMU injects them (docs/PERFORMANCE.md, round 15), so
the guest and QEMU each wake twice. The built-in device, whose TX runs in the vCPU thread,
rarely raises that TX interrupt at all.

``DeferredIrq`` stands between the device and the real sink: ``trigger`` only queues the
vector (once, in order). The loop (harness.server.loop.DeviceLoop) takes one more round of
events without sleeping before it raises what is queued, so an answer already waiting (the
ping's reply) is handled first and its interrupt goes out with the others, and it raises them
all at the start of the round after that, before it can block: the delay is one round of
ring work at most, and no interrupt is ever held across a sleep. The spec gives a device's
notification no deadline; a driver that took the buffers meanwhile (it polls) finds nothing
new, as for any interrupt it had not asked for again.

``event`` (the default) raises every interrupt at once, as before.
"""

from __future__ import annotations

from harness import knobs
from harness.virtio.protocols import InterruptSink

__all__ = ["IRQ_AT_ENV", "DeferredIrq", "irq_at_idle"]

IRQ_AT_ENV = "HARNESS_IRQ_AT"


def irq_at_idle() -> bool:
    """True for HARNESS_IRQ_AT=idle, False for event (the default); ValueError for anything
    else, so a mistyped A/B side fails loudly."""
    return knobs.choice(IRQ_AT_ENV, ("event", "idle"), "event") == "idle"


class DeferredIrq:
    """An InterruptSink that queues vectors until ``flush`` raises them through ``inner``."""

    def __init__(self, inner: InterruptSink) -> None:
        self.inner = inner
        self._queued: dict[int, None] = {}  # vectors in the order first raised
        #: Interrupts a flush raised, and those that joined one already queued (coalesced).
        self.flushed = 0
        self.coalesced = 0

    def trigger(self, vector: int) -> None:
        if vector in self._queued:
            self.coalesced += 1
        else:
            self._queued[vector] = None

    @property
    def pending(self) -> bool:
        return bool(self._queued)

    def flush(self) -> None:
        """Raise every queued vector, in order."""
        queued, self._queued = self._queued, {}
        for vector in queued:
            self.inner.trigger(vector)
        self.flushed += len(queued)

    def drop(self) -> None:
        """Forget what is queued (a device reset: those vectors mean nothing to the new driver)."""
        self._queued.clear()
