"""Misbehaviours: the device breaking the virtio 1.3 specification on purpose, in one named way.

A ``Misbehaviour`` names a case of ``CASES``, after how many completions it starts (``after``,
counted on its queue, or on both for ``any``), on which queue (``rx0``, ``tx0``, ``any``) and
whether it fires ``once`` or ``always``. Used-element cases leave the first N completions
alone and act on the next; the others act at their first chance once N completions are done
(a publish, an RX header, a TX kick, the end of a batch). A ``Misbehave`` holds the active
ones and their counters; the device and its queues hold it in their ``misbehave`` attribute,
``None`` when nothing is configured (then the hot path pays one attribute check per push,
flush and batch).

The hooks only change the values the device writes where it would write anyway: a used
element's id and len, used.idx, the RX vnet header of a buffer the chain maps, the config
space values, and interrupts and NEEDS_RESET. The ledger stays on: a misbehaviour never makes
the device touch memory outside a mapping.

The catalogue itself (clauses, bug classes) is harness.virtio.misbehave_catalogue.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from harness.virtio.misbehave_catalogue import CASES, POINTS, QUEUES, Case

__all__ = ["CASES", "POINTS", "QUEUES", "Case", "Misbehave", "Misbehaviour", "parse_list",
           "spec_list"]

#: reset-never-completes: status reads that still show the old value after a reset. Linux polls
#: with msleep(1) between reads, so this is a few seconds at most: bounded, the device recovers.
STUCK_RESET_READS = 2000
#: slow-completions: how long each used-buffer notification is held back.
SLOW_SECONDS = 0.020
#: A completion this long after the firing belongs to a later round of traffic (a guest round
#: trip under TCG takes longer; completions of the same batch come microseconds apart).
RESUME_GAP = 0.005
#: used-idx-jump / used-idx-backwards: how long the wrong used.idx stands. The queue publishes
#: nothing meanwhile and the wrong publish always interrupts, so the driver reads the wrong
#: value whatever the timing. (Corrected by the very next publish, as these cases first were,
#: whether the driver saw it at all was a race: docs/MISBEHAVE.md.)
PUBLISH_HOLD = 0.5
#: lost-interrupt-rx / interrupt-wrong-vector-rx act only on a notification whose completions
#: came after this much silence on the queue (seconds). A driver still in its RX poll (or
#: between re-arming and its last look at used.idx) finds the frame without the notification,
#: so dropping or misrouting that one was a race the driver sometimes won (graceful once in
#: about 20 gates); after the silence the driver re-armed long ago and waits for exactly this
#: notification. Completions closer than BATCH_GAP belong to the same batch.
QUIET = 0.05
BATCH_GAP = 0.001
QUIET_CASES = ("lost-interrupt-rx", "interrupt-wrong-vector-rx")
_FEATURES_OK = 0x08
_FAILED = 0x80
_NEEDS_RESET = 0x40
_GUEST_CSUM = 1
_GUEST_TSO4 = 7
#: The hold's clock (a test replaces it).
_clock = time.monotonic

def _parse_count(value: str, text: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{text!r}: after={value!r} is not a whole number") from None
    if n < 0:
        raise ValueError(f"{text!r}: after must be 0 or more")
    return n


@dataclass(frozen=True)
class Misbehaviour:
    """One configured misbehaviour: ``CASE[:after=N][:queue=Q][:always|:once]``."""

    case: str
    after: int = 0
    queue: str = "any"
    always: bool = False

    def __post_init__(self) -> None:
        if self.case not in CASES:
            raise ValueError(f"unknown misbehaviour {self.case!r} (cases: {', '.join(CASES)})")
        if self.queue not in QUEUES:
            raise ValueError(f"queue must be one of {', '.join(QUEUES)}, not {self.queue!r}")
        if self.queue != "any" and self.queue not in CASES[self.case].queues:
            raise ValueError(f"{self.case} acts on {'/'.join(CASES[self.case].queues)}, "
                             f"not {self.queue}")
        if isinstance(self.after, bool) or not isinstance(self.after, int) or self.after < 0:
            raise ValueError(f"after must be a whole number >= 0, not {self.after!r}")

    @classmethod
    def parse(cls, text: str) -> Misbehaviour:
        """'used-len-zero:after=100:queue=rx0:always' -> Misbehaviour; ValueError if bad."""
        parts = text.strip().split(":")
        case, after, queue, always = parts[0], 0, "any", False
        for p in parts[1:]:
            key, eq, value = p.partition("=")
            if key == "after" and eq:
                after = _parse_count(value, text)
            elif key == "queue" and eq:
                queue = value
            elif p in ("always", "once"):
                always = p == "always"
            else:
                raise ValueError(f"{text!r}: unknown option {p!r} (after=N, queue=Q, always, "
                                 "once)")
        return cls(case, after, queue, always)

    def __str__(self) -> str:
        s = self.case
        if self.after:
            s += f":after={self.after}"
        if self.queue != "any":
            s += f":queue={self.queue}"
        return s + (":always" if self.always else "")


def parse_list(text: str) -> tuple[Misbehaviour, ...]:
    """A comma list of specs; ValueError on the first bad one."""
    return tuple(Misbehaviour.parse(t) for t in text.split(",") if t.strip())


def spec_list(text: str) -> str:
    """argparse type: validates a comma list and returns it normalised (a one-line error)."""
    try:
        specs = parse_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not specs:
        raise argparse.ArgumentTypeError("empty misbehaviour spec")
    return ",".join(str(s) for s in specs)


@dataclass
class Misbehave:
    """The active misbehaviours of one device and what they have done."""

    specs: list[Misbehaviour] = field(default_factory=list)
    completions: dict[str, int] = field(default_factory=lambda: {"rx0": 0, "tx0": 0})
    #: case name -> times it acted.
    fired: dict[str, int] = field(default_factory=dict)
    tx_stalled: bool = False
    _spent: set[int] = field(default_factory=set)  # indexes of specs that fired once
    #: used-out-of-order: the held-back frame's used elements per queue, the queues whose held
    #: frame is still being collected, and the queues in the middle of a (merged) frame.
    _held: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    _holding: set[str] = field(default_factory=set)
    _mid: set[str] = field(default_factory=set)
    #: Queues in the middle of a frame used-never-returned drops whole (its later buffers).
    _dropping: set[str] = field(default_factory=set)
    _reset_reads: int = 0  # reset-never-completes: stuck reads left
    _stuck_status: int = 0
    _forbidden: bool = False  # forbidden-feature-combo fired: keep offering the combination
    #: Time to recover: when a case first acted, when each queue next completed a chain in a
    #: later round (RESUME_GAP after it), when the driver reset or failed the device.
    fired_at: float | None = None
    _resumed: dict[str, float] = field(default_factory=dict)
    _disabled_at: float | None = None
    #: Queue -> until when its wrong used.idx stands (used-idx-jump, used-idx-backwards).
    _publish_held: dict[str, float] = field(default_factory=dict)
    #: Queue -> when it last completed a chain, and the silence before its current batch.
    _last_push: dict[str, float] = field(default_factory=dict)
    _silence: dict[str, float] = field(default_factory=dict)

    def add(self, spec: Misbehaviour) -> None:
        self.specs.append(spec)

    def _count(self, queue: str) -> int:
        if queue == "any":
            return sum(self.completions.values())
        return self.completions.get(queue, 0)

    def due(self, point: str, queue: str | None, only: str | None = None,
            skip: tuple[str, ...] = ()) -> Misbehaviour | None:
        """The first spec acting at ``point`` on ``queue`` (None: any) that is due now (and is
        case ``only``, if given, and none of ``skip``); it is recorded as fired."""
        for i, s in enumerate(self.specs):
            case = CASES[s.case]
            if case.point != point or i in self._spent or only not in (None, s.case) or (
                    s.case in skip):
                continue
            if queue is not None and queue not in case.queues:
                continue
            if queue is not None and s.queue not in ("any", queue):
                continue
            if self._count(s.queue) < s.after:
                continue
            if not s.always:
                self._spent.add(i)
            if self.fired_at is None:
                self.fired_at = time.monotonic()
            self.fired[s.case] = self.fired.get(s.case, 0) + 1
            return s
        return None

    def on_push(self, queue: str, head: int, length: int, write_len: int, read_len: int,
                size: int, more: bool = False) -> list[tuple[int, int]]:
        """A completion on ``queue``: the used elements (id, len) to write for it, in order
        (none: held back or dropped; more: a duplicate or a held-back frame released); then
        counted (so ``after=N`` leaves the first N completions alone). ``more``: the next
        completion is the same frame's (MRG_RXBUF): a frame is held back and released whole,
        so a reordering never splits one (5.1.6.4: its buffers are used together)."""
        starting = queue not in self._mid
        now = _clock()
        gap = now - self._last_push.get(queue, float("-inf"))
        self._last_push[queue] = now
        if gap > BATCH_GAP:  # a new batch: the silence before it decides the QUIET_CASES
            self._silence[queue] = gap
        if more:
            self._mid.add(queue)
        else:
            self._mid.discard(queue)
        if queue in self._holding:  # the rest of the frame being held back joins it
            self._held[queue].append((head, length))
            if not more:
                self._holding.discard(queue)
            self.completions[queue] = self.completions.get(queue, 0) + 1
            return []
        if queue in self._dropping:  # the rest of the frame being dropped goes with it
            if not more:
                self._dropping.discard(queue)
            self.completions[queue] = self.completions.get(queue, 0) + 1
            return []
        # Both act on whole frames only: a frame's buffers are used together (5.1.6.4); one
        # buffer of a merged frame dropped or moved would be a num_buffers bug, another case.
        skip = (() if starting and queue not in self._held else ("used-out-of-order",)) + (
            () if starting else ("used-never-returned",))
        s = self.due("used", queue, skip=skip)
        self.completions[queue] = self.completions.get(queue, 0) + 1
        if self.fired_at is not None and queue not in self._resumed:
            now = time.monotonic()
            if now - self.fired_at >= RESUME_GAP:
                self._resumed[queue] = now
        # The held frame goes after the whole of its successor frame.
        held = None if more else self._held.pop(queue, None)
        out = self._push(s, head, length, write_len, read_len, size, queue, more)
        return out if held is None else [*out, *held]

    def _push(self, s: Misbehaviour | None, head: int, length: int, write_len: int,
              read_len: int, size: int, queue: str, more: bool) -> list[tuple[int, int]]:
        if s is None:
            return [(head, length)]
        case = s.case
        if case == "used-len-overflow":
            return [(head, write_len + 4096)]
        if case == "used-len-zero":
            return [(head, 0)]
        if case == "used-id-out-of-range":
            return [(size + head, length)]
        if case == "tx-used-len-nonzero":
            return [(head, read_len)]
        if case == "rx-len-below-header":
            return [(head, 5)]
        if case == "tx-completion-wrong-id":
            return [((head ^ 1) & (size - 1), length)]
        if case == "used-out-of-order":
            self._held[queue] = [(head, length)]
            if more:
                self._holding.add(queue)
            return []
        if case == "used-never-returned":
            if more:
                self._dropping.add(queue)
            return []
        return [(head, length), (head, length)]  # used-id-duplicate

    def hold_publish(self, queue: str) -> None:
        """``queue`` just published a wrong used.idx: it stands for ``PUBLISH_HOLD``."""
        self._publish_held[queue] = _clock() + PUBLISH_HOLD

    def publish_hold(self, queue: str) -> bool | None:
        """At a publish of ``queue``: None when no wrong used.idx of it stands, True while one
        does (publish nothing), False once its time is up (the hold ends here: publish the
        right value now, even with nothing new to publish)."""
        until = self._publish_held.get(queue)
        if until is None:
            return None
        if _clock() < until:
            return True
        del self._publish_held[queue]
        return False

    def publish_due(self) -> float | None:
        """When the first wrong used.idx still standing has stood its time (the device's
        timer: it publishes the right one then, not at a next completion that may not come)."""
        return min(self._publish_held.values(), default=None)

    def publish_over(self) -> list[str]:
        """The queues whose wrong used.idx has stood its time (their next publish corrects it)."""
        now = _clock()
        return [q for q, until in self._publish_held.items() if now >= until]

    def on_interrupt(self, queue: str, vector: int, vectors: list[int]) -> int:
        """A used-buffer notification of ``queue`` about to go on ``vector`` (``vectors``: every
        queue's): the vector to send it on, or -1 to send none."""
        # The first notification after silence, the driver surely waiting for it (QUIET):
        # only then may the RX notification cases act (a later one of the same batch may find
        # the driver polling again).
        quiet = self._silence.pop(queue, 0.0) >= QUIET
        s = self.due("interrupt", queue, skip=() if quiet else QUIET_CASES)
        if s is None:
            return vector
        if s.case in ("lost-interrupt", "lost-interrupt-rx"):
            return -1
        if s.case in ("interrupt-wrong-vector", "interrupt-wrong-vector-rx"):
            return next((v for v in vectors if v != vector), vector)
        time.sleep(SLOW_SECONDS)  # slow-completions: the whole device waits, as a slow one would
        return vector

    def on_queue_reset(self, queue: str) -> None:
        """The driver reset ``queue`` alone (VIRTIO_F_RING_RESET): as at a device reset, a
        held-back frame belongs to the rings that went with it."""
        self._held.pop(queue, None)
        self._holding.discard(queue)
        self._mid.discard(queue)
        self._dropping.discard(queue)
        self._publish_held.pop(queue, None)

    def on_status_write(self, old: int, value: int) -> int:
        """The driver writes ``value`` to the status (``old``): what the device keeps."""
        if self.fired_at is not None and self._disabled_at is None and (
                value == 0 or value & _FAILED):
            self._disabled_at = time.monotonic()
        if value == 0:
            self._reset_reads = 0
            # a held-back frame belongs to the rings the reset dropped
            self._held.clear()
            self._holding.clear()
            self._mid.clear()
            self._dropping.clear()
            self._publish_held.clear()
            s = self.due("status", None, only="reset-never-completes")
            if s is not None:
                self._reset_reads = STUCK_RESET_READS
                self._stuck_status = old
            return 0
        if value & _FEATURES_OK and not old & _FEATURES_OK:
            s = self.due("status", None, only="features-ok-refused")
            if s is not None:
                return value & ~_FEATURES_OK
            s = self.due("status", None, only="needs-reset-during-probe")
            if s is not None:
                return value | _NEEDS_RESET
        return value

    def on_status_read(self, status: int) -> int:
        """The status the driver reads (reset-never-completes: the old one for a while)."""
        if self._reset_reads > 0:
            self._reset_reads -= 1
            return self._stuck_status or 1
        return status

    def on_features(self, features: int) -> int:
        """The features offered when the driver reads them."""
        if self._forbidden or self.due("features", None) is not None:
            self._forbidden = True
            return (features | 1 << _GUEST_TSO4) & ~(1 << _GUEST_CSUM)
        return features

    def recover_seconds(self) -> float | None:
        """Seconds from the first firing until traffic resumed on both queues, else until the
        driver reset or failed the device (cleanly disabled); None: neither (yet)."""
        if self.fired_at is None:
            return None
        if len(self._resumed) == 2:
            return round(max(self._resumed.values()) - self.fired_at, 3)
        if self._disabled_at is not None:
            return round(self._disabled_at - self.fired_at, 3)
        return None

    def state(self) -> dict[str, object]:
        return {"specs": [str(s) for s in self.specs], "completions": dict(self.completions),
                "fired": dict(self.fired), "tx_stalled": self.tx_stalled,
                "recover_s": self.recover_seconds(),
                "recovered_by": ("traffic" if len(self._resumed) == 2 else
                                 "reset" if self._disabled_at is not None else None)}
