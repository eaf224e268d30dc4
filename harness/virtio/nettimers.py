"""The TX side's timer, per queue pair: the kick hold-off (``HARNESS_TX_HOLDOFF_US``, off by
default; harness.virtio.netdefs).

After a TX flush that drained a stream, the device leaves the driver's kicks suppressed and
looks at the ring again when the time is up (QEMU's tx=timer idea). VirtioNetDevice owns one
TxTimers, asks ``due_holds`` in process() and gives ``next`` to the server loop (DeviceLoop
wakes for it without a kick). Resets clear what belongs to the ring reset, so no timer
outlives its ring (a loop waking for it forever would spin).

A second timer was tried here in round 6 of issue 12 (a deferred TX interrupt, raised only if
the driver still wanted it when due; commit 6d50a0a) and removed: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TxTimers:
    """Per pair: when a held-off ring is looked at again (0.0: not held)."""

    def __init__(self, pairs: int, holdoff: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        #: Seconds (0.0: off).
        self.holdoff = holdoff
        #: The time source (tests freeze it: a slow machine must not let a hold expire
        #: between two steps of a test).
        self.clock = clock
        self.hold = [0.0] * pairs
        #: TX flushes that ended held off rather than asking for kicks.
        self.holdoffs = 0

    def next(self) -> float | None:
        """The earliest time (time.monotonic) a hold falls due; None when none is set."""
        if not self.holdoff:  # the common case, asked on every loop turn: no list built
            return None
        due = [t for t in self.hold if t]
        return min(due) if due else None

    def start_hold(self, pair: int) -> None:
        self.hold[pair] = self.clock() + self.holdoff
        self.holdoffs += 1

    def due_holds(self) -> list[int]:
        """The pairs whose hold-off is up (their timers cleared)."""
        if not any(self.hold):  # nothing held (the caller checks that the knob is on)
            return []
        now = self.clock()
        pairs = [p for p, t in enumerate(self.hold) if t and t <= now]
        for p in pairs:
            self.hold[p] = 0.0
        return pairs

    def clear(self, pair: int) -> None:
        """Pair's TX ring was reset: its timer must not outlive it."""
        self.hold[pair] = 0.0

    def clear_all(self) -> None:
        self.hold = [0.0] * len(self.hold)

    def stats(self) -> dict[str, int]:
        """The knob (us) and counter when the hold-off is on (nothing when it is off)."""
        if not self.holdoff:
            return {}
        return {"tx_holdoff_us": round(self.holdoff * 1e6), "tx_holdoffs": self.holdoffs}
