"""``python -m harness.bench.roundtrip``: what the guest waits for each DMA_MAP/UNMAP behind a
vIOMMU, seen from QEMU's side, next to our server's own reply time.

Behind a vIOMMU every guest mapping is a vfio-user DMA_MAP (and its unmap a DMA_UNMAP) that
QEMU's vCPU thread sends and then waits for. The device server times its reply from when the
request can have arrived (``dma_latency`` in its stats); this probe times the whole round trip
where the guest pays it: QEMU's own trace events (``--qemu-trace``), with wall-clock
timestamps, from ``vfio_user_send_write`` of a DMA request to ``vfio_user_recv_hdr`` of its
reply (same message id). The difference is what neither side's code does: waking our server,
and waking QEMU's vfio-user reader thread and then the vCPU again.

One boot of the Testbed with ``--viommu``, one guest command (by default 64-byte UDP datagrams
to the host for ``--seconds``), then QEMU's log of that window is read. Tracing has a cost of
its own (a log line per event): compare rates with ``harness bench net``, not with this.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import argtypes, proc
from harness.vfu.latency import percentile

__all__ = ["Trip", "main", "message_id", "parse", "reply_id", "run_traced", "summarize",
           "trace_lines"]

#: --help's description: the docstring's first sentence, without the command's own name.
_DESCRIPTION = " ".join((__doc__ or "").split("\n\n")[0].split()).split(": ", 1)[-1]

#: The events the probe needs: which message a send is (map/unmap), its id, its reply's id.
EVENTS = ("vfio_user_dma_map", "vfio_user_dma_unmap", "vfio_user_send_write",
          "vfio_user_recv_hdr")
#: ``-msg timestamp=on``: "2026-12-01T16:02:15.665988Z vfio_user_send_write  id 0x1ec ..."
_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+)Z (\w+) ?(.*)$")
_ID = re.compile(r"\bid (0x[0-9a-f]+)")
_FLAGS = re.compile(r"\bflags (0x[0-9a-f]+)")
_REPLY = 0x1  # VFIO_USER_F_TYPE_REPLY in the header's flags


@dataclass
class Trip:
    """One DMA request QEMU sent and waited for: its kind, when it went out, when its reply
    header came back (microseconds since the epoch: the log's own resolution, exactly)."""

    kind: str  # "map" or "unmap"
    sent: int
    replied: int

    @property
    def wait(self) -> float:
        """Seconds."""
        return (self.replied - self.sent) / 1e6


@dataclass
class Window:
    """The trips of one traced window, and how long the window was (first to last event)."""

    trips: list[Trip] = field(default_factory=list)
    span: float = 0.0
    #: Requests sent with no reply in the window: (kind, when sent in microseconds).
    unanswered: list[tuple[str, int]] = field(default_factory=list)


def _stamp(text: str) -> int:
    dt = datetime.fromisoformat(text + "+00:00")
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def trace_lines(log: str) -> Iterator[tuple[int, str, str]]:
    """(microseconds, event, arguments) of each trace event line of a QEMU log written with
    timestamps; other lines (console, QEMU's own messages) are skipped."""
    for line in log.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        try:
            t = _stamp(m[1])
        except ValueError:
            continue
        yield t, m[2], m[3]


def message_id(args: str) -> str | None:
    """The message id of a ``send_write``/``recv_hdr`` event."""
    mid = _ID.search(args)
    return None if mid is None else mid[1]


def reply_id(args: str) -> str | None:
    """The id of a ``recv_hdr`` that is a reply (the header's reply flag), else None."""
    flags = _FLAGS.search(args)
    if flags is None or not int(flags[1], 16) & _REPLY:
        return None
    return message_id(args)


def parse(log: str) -> Window:
    """The DMA round trips in a QEMU log written with the EVENTS on and timestamps.

    A ``vfio_user_dma_map``/``_unmap`` event names the kind of the next ``send_write`` (QEMU
    traces the message, then writes it, on the same thread); the reply is the ``recv_hdr``
    with the same id and the reply flag. Other messages (region writes: doorbells) and lines
    that are not trace events are skipped."""
    win = Window()
    kind: str | None = None
    pending: dict[str, tuple[str, int]] = {}
    first = last = None
    for t, event, args in trace_lines(log):
        first = t if first is None else first
        last = t
        if event == "vfio_user_dma_map":
            kind = "map"
        elif event == "vfio_user_dma_unmap":
            kind = "unmap"
        elif event == "vfio_user_send_write":
            mid = message_id(args)
            if kind is not None and mid is not None:
                pending[mid] = (kind, t)
            kind = None
        elif event == "vfio_user_recv_hdr":
            rid = reply_id(args)
            sent = None if rid is None else pending.pop(rid, None)
            if sent is not None:
                win.trips.append(Trip(sent[0], sent[1], t))
    if first is not None and last is not None:
        win.span = (last - first) / 1e6
    win.unanswered = list(pending.values())
    return win


def _us(ascending: list[float], q: float) -> float | None:
    p = percentile(ascending, q)
    return None if p is None else round(p * 1e6, 1)


def summarize(win: Window, server: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per kind: count and QEMU-side wait p50/p90/p99 (us); the share of the window the vCPUs
    spent waiting; with the server's ``dma_latency`` stats, the p50 of its own work beside
    each: libvfio-user (``library``: the message read, up to our callback) and our callback.
    Not the server's ``reply``: that is an upper bound from the loop's last wake-up, which can
    exceed the whole round trip when the request came in during ring work."""
    out: dict[str, Any] = {"span_s": round(win.span, 3)}
    total = 0.0
    for kind in ("map", "unmap"):
        waits = sorted(t.wait for t in win.trips if t.kind == kind)
        total += sum(waits)
        row: dict[str, Any] = {"count": len(waits), "p50_us": _us(waits, 50),
                               "p90_us": _us(waits, 90), "p99_us": _us(waits, 99)}
        for part in ("library", "callback"):
            p50 = ((server or {}).get(f"{kind}_{part}") or {}).get("p50_us")
            if p50 is not None:
                row[f"server_{part}_p50_us"] = p50
        out[kind] = row
    out["waited_share"] = round(total / win.span, 3) if win.span > 0 else None
    return out


def _cell(v: object) -> str:
    return "-" if v is None else f"{v} us"


def table(summary: dict[str, Any]) -> str:
    f = _cell
    lines = [f"{'request':9} {'count':>6} {'guest waits p50':>15} {'p90':>9} {'p99':>9}   "
             f"{'server: library p50':>19} {'callback p50':>12}"]
    for kind in ("map", "unmap"):
        r = summary[kind]
        lines.append(f"DMA_{kind.upper():5} {r['count']:>6} {f(r['p50_us']):>15} "
                     f"{f(r['p90_us']):>9} {f(r['p99_us']):>9}   "
                     f"{f(r.get('server_library_p50_us')):>19} "
                     f"{f(r.get('server_callback_p50_us')):>12}")
    share = summary["waited_share"]
    if share is not None:
        lines.append(f"the guest's vCPUs waited for replies {100 * share:.0f}% of the "
                     f"{summary['span_s']} s traced")
    return "\n".join(lines)


#: The host peer's TCP sink takes this much of a guest->host stream.
PEER_TCP_BYTES = 16 << 20


def run_traced(command: str, run_dir: Path, events: tuple[str, ...] = EVENTS, *,
               viommu: bool = True, device: str = "ours",
               offloads: bool = False) -> tuple[str, dict[str, Any], str]:
    """Boot (by default with ``--viommu`` and our device) with QEMU tracing ``events``, run
    ``command`` in the guest; return QEMU's log of that window, the server's DMA latency
    stats (none for the built-in device) and the command's output. ``offloads``: both
    devices offer checksum and TSO offloads (as ``harness bench net``'s offloads config)."""
    from harness.testbed import SHELL_CMDLINE, PeerSpec, Testbed, TestbedConfig

    cfg = TestbedConfig(viommu=viommu, device=device, offloads=offloads, qemu_trace=events,
                        cmdline=SHELL_CMDLINE,
                        peers=PeerSpec(tcp_bytes=PEER_TCP_BYTES, udp_count=1))
    with Testbed(cfg, run_dir) as tb:
        tb.wait_shell(300.0)
        log = run_dir / "qemu.log"
        start = log.stat().st_size
        res = tb.guest.run(command, timeout=600.0)
        time.sleep(0.2)  # the last reply's line
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        stats = tb.device.stats() if device == "ours" else {}
    output = (res.stdout + res.stderr).decode(errors="replace").strip()
    latency = stats.get("vfio_user", {}).get("dma_latency", {})
    return text, latency, output


def run(command: str, run_dir: Path) -> tuple[Window, dict[str, Any], str]:
    """Boot, run ``command`` in the guest, return the traced window, the server's DMA
    latency stats and the command's output."""
    text, latency, output = run_traced(command, run_dir)
    return parse(text), latency, output


def main(argv: list[str] | None = None) -> int:
    from harness import paths

    p = argparse.ArgumentParser(prog="python -m harness.bench.roundtrip",
                                description=_DESCRIPTION)
    p.add_argument("--seconds", type=argtypes.seconds, default=2.0,
                   help="how long the default command sends (default 2)")
    p.add_argument("--command", default="", metavar="CMD",
                   help="guest command instead of the default `hnet udp-tx` to the host")
    p.add_argument("--json", action="store_true", help="one JSON object")
    a = p.parse_args(argv)
    command = a.command or (f"hnet udp-tx --host 198.18.0.1 --port 5004 --size 64 "
                            f"--seconds {a.seconds}")
    run_dir = paths.new_run_dir(paths.build_dir() / "roundtrip")
    try:
        # SIGTERM/SIGHUP end the run like Ctrl-C: the Testbed's clean-up (QEMU, the server,
        # the namespace) runs on the way out.
        with proc.interrupts():
            win, latency, output = run(command, run_dir)
    except (paths.EnvError, OSError, TimeoutError, ValueError) as exc:
        print(f"roundtrip: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return proc.report_interrupted("roundtrip", exc)
    summary = summarize(win, latency)
    if a.json:
        print(json.dumps({"command": command, "output": output, **summary}))
    else:
        print(f"guest: {command}\n  {output}")
        print(table(summary))
        print(f"run directory: {run_dir}")
    return 0 if win.trips else 1


if __name__ == "__main__":
    sys.exit(main())
