"""``python -m harness.bench.timeline``: where the guest's time goes, as the gaps between
QEMU's own trace events for the NIC: ours behind a vIOMMU (the default), ours without one, or
QEMU's built-in virtio-net-pci, so one workload's sequences can be set side by side.

``harness.bench.roundtrip`` times each DMA_MAP/UNMAP round trip; this puts those round trips
in the sequence of everything else QEMU sees of the device: the guest's IOTLB invalidations
(``vtd_inv_desc_iotlb_pages``: a map or unmap on its way), the requests going out and their
replies coming back, the doorbells (``vfio_region_write``; the built-in device's
``virtio_queue_notify``) and the interrupts QEMU injects (``vfio_msi_interrupt``, by vector;
the built-in device's ``virtio_notify``, by queue). Every gap between two consecutive events
is charged to that pair (``map reply -> inv``: from a DMA_MAP's reply to the guest's next
invalidation); the table ranks the pairs by time, so it says how much of the window the guest
spent waiting for our replies, how much in QEMU before each request went out, and how much
elsewhere, which no server change can win back. Without a vIOMMU it splits a request/response
workload into the device's side (``doorbell -> irq``: the device, the host and the interrupt's
way into the guest) and the guest's (``irq -> doorbell``), for ours and the built-in device.

Events from different threads interleave, so a pair is a stretch of the timeline, not one
thread's work. One boot of the Testbed, one guest command (by default 4 MiB of TCP
guest->host), then QEMU's log of that window is read. Tracing costs QEMU a log line per
event: compare shares, not rates, with ``harness bench net``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from harness import argtypes, proc
from harness.bench import roundtrip

__all__ = ["EVENTS", "Timeline", "main", "marks", "sides", "summarize", "table"]

_DESCRIPTION = " ".join((__doc__ or "").split("\n\n")[0].split()).split(": ", 1)[-1]

#: roundtrip's events (the requests and their replies) and what happens around them.
EVENTS = (*roundtrip.EVENTS, "vfio_region_write", "vfio_msi_interrupt",
          "vtd_inv_desc_iotlb_pages", "virtio_queue_notify", "virtio_notify")
DEFAULT_COMMAND = "hnet tcp-send --host 198.18.0.1 --port 5001 --bytes {nbytes} --seed 1"


def marks(log: str) -> list[tuple[int, str]]:
    """The labelled events of a QEMU log written with EVENTS on and timestamps, in time
    order: (microseconds, label). A request's ``send_write`` becomes ``map sent``/``unmap
    sent`` (its ``vfio_user_dma_*`` line names it), its reply ``map reply``/``unmap reply``;
    a doorbell's own message is not a mark (``vfio_region_write`` is), nor is a reply to
    anything else. The built-in device's doorbells are ``doorbell`` too, its interrupts
    ``irq q<N>`` (the queue its ``virtio_queue_notify`` lines name for that virtqueue, ``?``
    before one has)."""
    win = roundtrip.parse(log)  # the requests, paired with their replies by message id
    out = [mark for trip in win.trips
           for mark in ((trip.sent, f"{trip.kind} sent"), (trip.replied, f"{trip.kind} reply"))]
    out += [(sent, f"{kind} sent") for kind, sent in win.unanswered]
    queues: dict[str, str] = {}  # the built-in device's virtqueue pointers -> queue index
    for t, event, args in roundtrip.trace_lines(log):
        if event == "vfio_region_write":
            out.append((t, "doorbell"))
        elif event == "virtio_queue_notify":
            words = args.split()  # vdev 0x... n 1 vq 0x...
            if "n" in words and "vq" in words:
                queues[_after(words, "vq")] = _after(words, "n")
            out.append((t, "doorbell"))
        elif event == "virtio_notify":
            out.append((t, f"irq q{queues.get(_after(args.split(), 'vq'), '?')}"))
        elif event == "vfio_msi_interrupt":
            vector = args.split("vector ", 1)[1].split()[0] if "vector " in args else "?"
            out.append((t, f"irq {vector}"))
        elif event == "vtd_inv_desc_iotlb_pages":
            out.append((t, "inv"))
    out.sort(key=lambda mark: mark[0])  # QEMU's threads write their lines in any order
    return out


def _after(words: list[str], key: str) -> str:
    """The word after ``key`` in a trace line's arguments ("" if none)."""
    try:
        return words[words.index(key) + 1]
    except (ValueError, IndexError):
        return ""


@dataclass
class Timeline:
    """A window's marks counted by label and its gaps summed by (from, to) pair."""

    span_us: int = 0
    #: Time with at least one DMA request out and unanswered (the guest waiting for us).
    waited_us: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    #: (from, to) -> [gaps, total microseconds]
    pairs: dict[tuple[str, str], list[int]] = field(default_factory=dict)


def summarize(found: list[tuple[int, str]]) -> Timeline:
    tl = Timeline()
    for _, label in found:
        tl.counts[label] = tl.counts.get(label, 0) + 1
    out = 0  # requests sent and not answered yet
    for (t0, a), (t1, b) in itertools.pairwise(found):
        row = tl.pairs.setdefault((a, b), [0, 0])
        row[0] += 1
        row[1] += t1 - t0
        out += a.endswith(" sent") - a.endswith(" reply")
        if out > 0:
            tl.waited_us += t1 - t0
    if found:
        tl.span_us = found[-1][0] - found[0][0]
    return tl


def waited_share(tl: Timeline) -> float:
    """The share of the window with a DMA request out and its reply not back yet."""
    return tl.waited_us / tl.span_us if tl.span_us else 0.0


def sides(tl: Timeline) -> tuple[int, int]:
    """(device side, guest side) in microseconds: the gaps that end at an interrupt and begin
    at a doorbell or another interrupt (the device, the host and the interrupt's way in),
    and the gaps that end at a doorbell and begin at an interrupt or a doorbell (the guest's
    work up to its next kick). Other gaps (the vIOMMU's) are in neither."""
    def kick_or_irq(label: str) -> bool:
        return label == "doorbell" or label.startswith("irq ")

    device = guest = 0
    for (a, b), (_, us) in tl.pairs.items():
        if kick_or_irq(a) and b.startswith("irq "):
            device += us
        elif kick_or_irq(a) and b == "doorbell":
            guest += us
    return device, guest


def table(tl: Timeline, top: int = 16) -> str:
    counts = ", ".join(f"{label} {n}" for label, n in sorted(tl.counts.items()))
    lines = [f"window {tl.span_us / 1e6:.3f} s: {counts}",
             f"{'from -> to':28} {'gaps':>7} {'total ms':>9} {'share':>6} {'mean us':>8}"]
    ranked = sorted(tl.pairs.items(), key=lambda item: -item[1][1])
    for (a, b), (n, us) in ranked[:top]:
        share = 100 * us / tl.span_us if tl.span_us else 0.0
        lines.append(f"{a + ' -> ' + b:28} {n:>7} {us / 1e3:>9.1f} {share:>5.1f}% "
                     f"{us / n:>8.1f}")
    if len(ranked) > top:
        rest = sum(us for _, (_, us) in ranked[top:])
        lines.append(f"{f'({len(ranked) - top} more pairs)':28} {'':>7} {rest / 1e3:>9.1f}")
    kicks = tl.counts.get("doorbell", 0)
    if kicks and tl.span_us:
        device, guest = sides(tl)
        lines.append(f"device side (to an interrupt) {100 * device / tl.span_us:.1f}%, "
                     f"{device / kicks:.1f} us per doorbell; guest side (to a doorbell) "
                     f"{100 * guest / tl.span_us:.1f}%, {guest / kicks:.1f} us per doorbell")
    if any(label.endswith(" sent") for label in tl.counts):  # not without a vIOMMU
        lines.append(f"a DMA request out, its reply not back: {100 * waited_share(tl):.0f}% "
                     f"of the window")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from harness import paths

    p = argparse.ArgumentParser(prog="python -m harness.bench.timeline",
                                description=_DESCRIPTION)
    p.add_argument("--command", default="", metavar="CMD",
                   help="guest command instead of 4 MiB of TCP guest->host")
    p.add_argument("--bytes", type=argtypes.size, default=4 << 20, metavar="SIZE",
                   help="length of the default command's stream (default 4M, at most 16M: "
                        "what the host peer takes)")
    p.add_argument("--config", choices=("viommu", "plain"), default="viommu",
                   help="with the intel-iommu (the default) or without one")
    p.add_argument("--device", choices=("ours", "builtin"), default="ours",
                   help="our device (the default) or QEMU's built-in virtio-net-pci")
    p.add_argument("--offloads", action="store_true",
                   help="both devices offer checksum and TSO offloads")
    p.add_argument("--top", type=int, default=16, help="pairs to list (default 16)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    a = p.parse_args(argv)
    if not 0 < a.bytes <= roundtrip.PEER_TCP_BYTES:
        p.error(f"--bytes must be 1 to {roundtrip.PEER_TCP_BYTES}")
    if a.top < 1:
        p.error("--top must be at least 1")
    command = a.command or DEFAULT_COMMAND.format(nbytes=a.bytes)
    run_dir = paths.new_run_dir(paths.build_dir() / "timeline")
    try:
        # SIGTERM/SIGHUP end the run like Ctrl-C: the Testbed's clean-up runs on the way out.
        with proc.interrupts():
            log, _latency, output = roundtrip.run_traced(
                command, run_dir, EVENTS, viommu=a.config == "viommu", device=a.device,
                offloads=a.offloads)
    except (paths.EnvError, OSError, TimeoutError, ValueError) as exc:
        print(f"timeline: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return proc.report_interrupted("timeline", exc)
    (run_dir / "window.log").write_text(log)
    tl = summarize(marks(log))
    if a.json:
        pairs: list[dict[str, Any]] = [
            {"from": x, "to": y, "gaps": n, "total_us": us}
            for (x, y), (n, us) in sorted(tl.pairs.items(), key=lambda item: -item[1][1])]
        print(json.dumps({"command": command, "config": a.config, "device": a.device,
                          "offloads": a.offloads,
                          "output": output, "span_us": tl.span_us,
                          "counts": tl.counts, "pairs": pairs,
                          "device_side_us": sides(tl)[0], "guest_side_us": sides(tl)[1],
                          "waited_share": round(waited_share(tl), 3)}))
    else:
        config = a.config + ("+offloads" if a.offloads else "")
        print(f"{a.device} device, {config}; guest: {command}\n  {output}")
        print(table(tl, a.top))
        print(f"run directory: {run_dir}")
    return 0 if tl.counts else 1


if __name__ == "__main__":
    sys.exit(main())
