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

Clause numbers are those of virtio 1.3 (csd01) as the author remembers them, checked against
the 1.2 text where the numbering is the same; section titles are given so they can be found.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

QUEUES = ("rx0", "tx0", "any")

#: Where a case acts: "used" (push: a used element's id/len), "publish" (flush: used.idx),
#: "rx-header" (the RX vnet header), "tx" (TX processing), "device" (after a batch: config,
#: status, interrupts).
POINTS = ("used", "publish", "rx-header", "tx", "device")


@dataclass(frozen=True)
class Case:
    name: str
    point: str
    #: Queues the case can act on (its spec's ``queue`` must be one of them or "any").
    queues: tuple[str, ...]
    clause: str
    bug_class: str
    what: str


CASES: dict[str, Case] = {c.name: c for c in (
    Case("used-len-overflow", "used", ("rx0",),
         "2.7.8.2 (Device Requirements: The Virtqueue Used Ring): the device MUST NOT set "
         "len larger than the total writable length of the buffer (from memory)",
         "RX length trusted by the driver: CVE-2021-47352 class, 2025 virtio-net 'fix "
         "received length check in big packets'",
         "RX used.len = the chain's writable length + 4096"),
    Case("used-len-zero", "used", ("rx0",),
         "2.7.8.2: len is the number of bytes written into the buffer; the device MUST set "
         "it to at least the bytes written (a frame with header was written)",
         "driver accepts a runt / zero-length completion (underflow of len - hdr_len)",
         "RX used.len = 0 for a chain the device filled"),
    Case("used-id-out-of-range", "used", ("rx0", "tx0"),
         "2.7.8 (The Virtqueue Used Ring): id indexes the start of the used descriptor "
         "chain; a descriptor index is < Queue Size (2.7.5)",
         "driver indexes its per-descriptor state with a device-supplied id (OOB read/write)",
         "used.id = queue size + head"),
    Case("used-id-duplicate", "used", ("rx0", "tx0"),
         "2.7.8 / 2.7.13: a descriptor chain is returned once per time it was made available "
         "(from memory: no explicit MUST, implied by the ownership transfer)",
         "double completion: use-after-free / double free of the driver's buffer token",
         "the completed chain's used element is written twice (two used entries)"),
    Case("used-idx-jump", "publish", ("rx0", "tx0"),
         "2.7.8.2: the device MUST NOT make more buffers used than were made available; "
         "used.idx - last seen idx can then never exceed Queue Size",
         "driver walks stale used entries when the index runs ahead (virtqueue_get_buf on "
         "garbage)",
         "used.idx published as the right value + queue size + 1 (once), then corrected"),
    Case("used-idx-backwards", "publish", ("rx0", "tx0"),
         "2.7.8 (The Virtqueue Used Ring): idx indicates where the device would put the next "
         "descriptor entry; it only ever increments (modulo 2^16) (from memory)",
         "driver computes the number of new entries as used.idx - last_used (u16 underflow)",
         "used.idx published as one less than the last value published (once), then corrected"),
    Case("num-buffers-too-large", "rx-header", ("rx0",),
         "5.1.6.4.1: the device MUST set num_buffers to the number of descriptors (chains) "
         "used for the packet",
         "driver takes the next packet's buffer as the rest of this one (merged frame from "
         "two packets) or waits for buffers that never come",
         "RX header num_buffers = the real count + 1"),
    Case("gso-size-zero", "rx-header", ("rx0",),
         "5.1.6.4.1: with a GSO type set the device MUST set gso_size to the MSS (> 0), and "
         "only use GSO types the driver negotiated (GUEST_TSO4 is not, by default)",
         "gso_size 0 reaching skb_shinfo(skb)->gso_size: divide-by-zero / endless "
         "segmentation class (virtio_net_hdr_to_skb hardening, 2021-2024)",
         "RX header gso_type = TCPV4, gso_size = 0"),
    Case("csum-start-beyond-frame", "rx-header", ("rx0",),
         "5.1.6.4.1: with NEEDS_CSUM, csum_start and csum_offset MUST point inside the "
         "packet (from memory: the checksum is to be written at csum_start + csum_offset)",
         "unchecked checksum offsets: out-of-bounds checksum write in the stack "
         "(skb_partial_csum_set class)",
         "RX header flags = NEEDS_CSUM, csum_start = 0xfff0, csum_offset = 16"),
    Case("num-buffers-zero", "rx-header", ("rx0",),
         "5.1.6.4 (Processing of Incoming Packets), 5.1.6.4.1: the device MUST set "
         "num_buffers to the number of descriptors (chains) used for the packet (>= 1)",
         "num_buffers trusted as a loop count (--num_buf underflow in receive_mergeable)",
         "RX header num_buffers = 0"),
    Case("bad-gso-type", "rx-header", ("rx0",),
         "5.1.6.4.1: the device MUST set gso_type to one of VIRTIO_NET_HDR_GSO_* (and only "
         "a GSO type the driver negotiated)",
         "unchecked vnet header fields reaching the stack (virtio_net_hdr_to_skb class, "
         "syzkaller GSO bugs)",
         "RX header gso_type = 0x7f"),
    Case("tx-stall", "tx", ("tx0",),
         "2.7.13 / 2.9 (Device Operation): buffers made available are eventually used; the "
         "device processes the queue after a notification (no MUST: liveness)",
         "TX timeout / watchdog path of the driver (virtnet_tx_timeout, netdev watchdog)",
         "TX chains are no longer consumed (kicks ignored) from then on"),
    Case("interrupt-storm", "device", ("rx0", "tx0"),
         "2.7.14 / 4.1.5.4 (used buffer notification): the device sends a used buffer "
         "notification after making buffers used (from memory: spurious ones are allowed "
         "but not expected in bulk)",
         "spurious interrupts: IRQ_NONE accounting, 'nobody cared' disabling the vector",
         "64 extra used-buffer interrupts with nothing new used, after every batch"),
    Case("link-flap", "device", ("rx0", "tx0"),
         "none broken: 5.1.4 (status: VIRTIO_NET_S_LINK_UP) and 4.1.4.3.1 (generation, "
         "config interrupt) are followed for each change; a legal but hostile sequence",
         "carrier handling races: link down/up work racing with NAPI and TX (netif_carrier "
         "flapping, stale queue state after carrier on)",
         "link down then up at once: two generation bumps, two config interrupts"),
    Case("config-change-no-interrupt", "device", ("rx0", "tx0"),
         "2.5.1 / 4.1.4.3.1: the device MUST change config_generation and (4.1.5.3) send a "
         "configuration change notification when device configuration changes",
         "driver caches config and never re-reads it (stale MAC/link, torn config reads)",
         "the MAC changes (last byte ^ 1) without a generation bump or config interrupt"),
    Case("needs-reset-midtraffic", "device", ("rx0", "tx0"),
         "2.1.2 (Device Status Field: DEVICE_NEEDS_RESET): the device sets it when it has "
         "experienced an error from which it can't recover; here with no error at all",
         "driver ignores or mishandles DEVICE_NEEDS_RESET (Linux has no handler in "
         "virtio_net)",
         "DEVICE_NEEDS_RESET + config interrupt; the device then stops serving queues"),
)}


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

    def add(self, spec: Misbehaviour) -> None:
        self.specs.append(spec)

    def _count(self, queue: str) -> int:
        if queue == "any":
            return sum(self.completions.values())
        return self.completions.get(queue, 0)

    def due(self, point: str, queue: str | None) -> Misbehaviour | None:
        """The first spec acting at ``point`` on ``queue`` (None: any) that is due now; it is
        recorded as fired."""
        for i, s in enumerate(self.specs):
            case = CASES[s.case]
            if case.point != point or i in self._spent:
                continue
            if queue is not None and queue not in case.queues:
                continue
            if queue is not None and s.queue not in ("any", queue):
                continue
            if self._count(s.queue) < s.after:
                continue
            if not s.always:
                self._spent.add(i)
            self.fired[s.case] = self.fired.get(s.case, 0) + 1
            return s
        return None

    def on_push(self, queue: str, head: int, length: int, write_len: int,
                size: int) -> tuple[int, int, bool]:
        """A completion on ``queue``: (head, len, write twice) to publish; then counted (so
        ``after=N`` leaves the first N completions alone)."""
        s = self.due("used", queue)
        self.completions[queue] = self.completions.get(queue, 0) + 1
        if s is None:
            return head, length, False
        case = s.case
        if case == "used-len-overflow":
            return head, write_len + 4096, False
        if case == "used-len-zero":
            return head, 0, False
        if case == "used-id-out-of-range":
            return size + head, length, False
        return head, length, True  # used-id-duplicate

    def state(self) -> dict[str, object]:
        return {"specs": [str(s) for s in self.specs], "completions": dict(self.completions),
                "fired": dict(self.fired), "tx_stalled": self.tx_stalled}
