"""The TX side's two timers, per queue pair: the kick hold-off and the deferred TX interrupt.

Both are off by default and switched on by an environment knob (harness.virtio.netdefs):

- **Hold-off** (``HARNESS_TX_HOLDOFF_US``): after a flush that drained a stream, the device
  leaves the driver's kicks suppressed and looks at the ring again when the time is up.
- **Deferred TX interrupt** (``HARNESS_TX_IRQ_DELAY_US``): a TX flush the driver wants an
  interrupt for does not raise it at once; when the time is up the device asks the ring again
  whether the driver, as it stands then, still wants one for everything published since
  (``Virtqueue.interrupt_wanted_since``). A transmit completion is not what anyone waits for:
  in a request/response exchange the response's RX interrupt comes first, the driver's RX
  poll frees the sent buffers on the way (Linux: virtnet_poll_cleantx) and moves its
  used_event past them, so the TX interrupt, an eventfd write here and an interrupt the TCG
  guest must take there, is never raised. Deferring a notification is the device's choice
  (the spec sets no deadline); skipping one the driver stopped wanting is what its
  suppression fields are for.

VirtioNetDevice owns one TxTimers, asks ``due`` in process() and gives ``next`` to the server
loop (DeviceLoop wakes for it without a kick). Resets clear what belongs to the ring reset.
"""

from __future__ import annotations

import time


class TxTimers:
    """Per pair: when a held-off ring is looked at again, when a deferred interrupt is due
    and the ring's ``published`` mark before it (0.0: no timer)."""

    def __init__(self, pairs: int, holdoff: float, irq_delay: float) -> None:
        #: Seconds (0.0: that timer is off).
        self.holdoff = holdoff
        self.irq_delay = irq_delay
        #: Anything to do at all (process() and next() return at once otherwise).
        self.active = bool(holdoff or irq_delay)
        self.hold = [0.0] * pairs
        self.irq = [0.0] * pairs
        self.irq_mark = [0] * pairs
        #: Due deferred interrupts not raised yet: (pair, mark), waiting for DMA (BME) to be
        #: allowed again. Out of ``irq``, so a loop does not spin on a timer stuck in the past.
        self.irq_ready: list[tuple[int, int]] = []
        #: TX flushes that ended held off rather than asking for kicks.
        self.holdoffs = 0
        #: TX interrupts deferred, and of those the ones the driver no longer wanted when due.
        self.irqs_deferred = 0
        self.irqs_saved = 0

    def next(self) -> float | None:
        """The earliest time (time.monotonic) a timer falls due; None when none is set."""
        if not self.active:
            return None
        due = [t for t in self.hold if t] + [t for t in self.irq if t]
        return min(due) if due else None

    def start_hold(self, pair: int) -> None:
        self.hold[pair] = time.monotonic() + self.holdoff
        self.holdoffs += 1

    def defer_irq(self, pair: int, mark: int) -> None:
        """Defer pair's TX interrupt; ``mark`` is the ring's ``published`` before the flush
        that wanted it. A later flush while one is deferred keeps the first time and mark."""
        if not self.irq[pair]:
            self.irq[pair] = time.monotonic() + self.irq_delay
            self.irq_mark[pair] = mark
            self.irqs_deferred += 1

    def due_holds(self, now: float) -> list[int]:
        """The pairs whose hold-off is up (their timers cleared)."""
        pairs = [p for p, t in enumerate(self.hold) if t and t <= now]
        for p in pairs:
            self.hold[p] = 0.0
        return pairs

    def collect_irqs(self, now: float) -> None:
        """Move the deferred interrupts that are due into ``irq_ready`` (timers cleared)."""
        for p, t in enumerate(self.irq):
            if t and t <= now:
                self.irq[p] = 0.0
                self.irq_ready.append((p, self.irq_mark[p]))

    def take_ready_irqs(self) -> list[tuple[int, int]]:
        """(pair, mark) of the due interrupts, to be raised now if still wanted."""
        ready, self.irq_ready = self.irq_ready, []
        return ready

    def clear(self, pair: int) -> None:
        """Pair's TX ring was reset: its timers must not outlive it."""
        self.hold[pair] = 0.0
        self.irq[pair] = 0.0
        self.irq_ready = [(p, m) for p, m in self.irq_ready if p != pair]

    def clear_all(self) -> None:
        for pair in range(len(self.hold)):
            self.clear(pair)

    def stats(self) -> dict[str, int]:
        """The knobs (us) and counters of the timers that are on (nothing when both are off)."""
        out: dict[str, int] = {}
        if self.holdoff:
            out.update(tx_holdoff_us=round(self.holdoff * 1e6), tx_holdoffs=self.holdoffs)
        if self.irq_delay:
            out.update(tx_irq_delay_us=round(self.irq_delay * 1e6),
                       tx_irqs_deferred=self.irqs_deferred, tx_irqs_saved=self.irqs_saved)
        return out
