"""`harness stats`, `harness link up|down`, `harness announce` and `harness dump-queue`: the
commands that show (or set) a running device's state, and the `stats` rendering.

Each finds the running VM through ``harness.session.find_run``, picks one device server's
control socket (``--device``, net0 by default) and sends it one request of the control protocol
(``harness.server.control``: a JSON line out, a JSON line back). ``stats`` becomes a table of
the queues and a few lines of map-ops, ledger and IOVA counters (rendered here);
``dump-queue`` a readable decoding of one virtqueue (``harness.inspect_dump``). ``--json``
prints the server's reply as it came, one line per reply. Every line of the human renderings
fits 80 columns; the shared formatting helpers are in ``harness.inspect_format``.

Renderers take the reply as plain JSON data and never trust its shape: a missing or odd field
shows as ``-`` or 0, never as a traceback. Whatever keeps a command from answering (no running
VM, an unknown device, a server that does not answer or refuses) is an :class:`InspectError`
whose message is the one line the command prints before exiting with status 2.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from harness.inspect_dump import render_dump
from harness.inspect_format import (
    _dict,
    _int,
    _list,
    _n,
    _short_size,
    clip,
    count,
    labelled,
    size,
    status_text,
    things,
)

#: Seconds a request may take before the device server counts as not answering.
TIMEOUT = 10.0
#: Longest reply line read (a dump of a 32768-entry queue is a few MiB).
MAX_REPLY = 64 << 20
#: (header, width, key in the per-queue stats) of the stats table; the queue name comes first.
_COLUMNS = (("avail", 5, "avail_idx"), ("used", 5, "used_idx"), ("kicks", 8, "kicks"),
            ("irqs", 8, "interrupts"), ("suppressed", 10, "interrupts_suppressed"),
            ("chains", 8, "chains"), ("bytes", 7, "bytes"), ("drops", 6, "drops"),
            ("errors", 6, "errors"))
_NAME_WIDTH = 6


class InspectError(Exception):
    """The command cannot answer; the message is the one line it prints (exit status 2)."""


# ---- talking to the device server -------------------------------------------------------------


def request(path: Path, cmd: str, *, timeout: float = TIMEOUT, **args: object) -> dict[str, Any]:
    """One control request on the socket at ``path``: the reply object (``ok`` true or not)."""
    line = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
    buf = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(line)
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise InspectError(f"reply from {path} longer than {MAX_REPLY} bytes")
    except TimeoutError:
        raise InspectError(f"the device server at {path} did not answer within "
                           f"{timeout:g} s") from None
    except OSError as exc:
        raise InspectError(f"cannot reach the device server at {path}: "
                           f"{exc.strerror or exc}") from None
    if not buf.endswith(b"\n"):
        raise InspectError(f"the device server at {path} closed the connection without a reply")
    try:
        reply = json.loads(buf)
    except ValueError:
        raise InspectError(f"the device server at {path} sent something that is not JSON: "
                           f"{bytes(buf[:60])!r}") from None
    if not isinstance(reply, dict):
        raise InspectError(f"the device server at {path} sent a {type(reply).__name__}, "
                           "not an object")
    return reply


def _ok(reply: dict[str, Any], what: str) -> dict[str, Any]:
    if reply.get("ok") is not True:
        raise InspectError(f"{what} refused: {reply.get('error', 'no reason given')}")
    return reply


def find_control(run_dir: Path | None, device: str) -> Path:
    """The control socket of ``device`` in the running VM (``run_dir``, or the newest run)."""
    from harness.session import find_run  # the run machinery only where a run is looked up

    try:
        run = find_run(run_dir)
    except LookupError as exc:
        raise InspectError(str(exc)) from None
    if device not in run.devices:
        known = ", ".join(run.devices) or "none"
        raise InspectError(f"no device {device!r} in the run in {run.run_dir} (devices: {known})")
    index = run.devices.index(device)
    if index >= len(run.control):
        raise InspectError(f"{run.run_dir}/run.json names no control socket for {device}")
    return Path(run.control[index])


# ---- stats ----------------------------------------------------------------------------------


def _queues(device: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The per-queue dicts of the device's stats, in the device's order, totals last."""
    rows = [(k, v) for k, v in device.items() if isinstance(v, dict) and k != "totals"]
    totals = device.get("totals")
    if isinstance(totals, dict):
        rows.append(("total", totals))
    return rows


def render_stats(reply: Mapping[str, Any], device: str = "net0") -> str:
    """A `stats` reply as a queue table and counter lines, each at most 80 columns."""
    stats = _dict(reply, "stats")
    dev = _dict(stats, "device")
    lines: list[str] = []
    features = _int(dev, "features")
    head = [status_text(_int(dev, "status")),
            f"features {features:#x}" if features is not None else "features -",
            things(_int(dev, 'resets'), 'reset')]
    up = stats.get("connected_seconds")
    if isinstance(up, (int, float)) and not isinstance(up, bool):
        head.append(f"connected {up:.0f} s")
    link = dev.get("link_up")
    if isinstance(link, bool):
        head.append("link up" if link else "LINK DOWN")
    if dev.get("needs_reset") is True:
        head.append("NEEDS RESET")
    lines += labelled(device, head)
    header = f"{'queue':<{_NAME_WIDTH}}" + "".join(
        f" {title:>{w}}" for title, w, _ in _COLUMNS)
    lines.append(header)
    for name, q in _queues(dev):
        cells = []
        for _title, w, key in _COLUMNS:
            if name == "total" and key in ("avail_idx", "used_idx"):
                cells.append(f" {'':>{w}}")
            elif q.get("packed") is True and key in ("avail_idx", "used_idx"):
                cells.append(f" {_pos_wrap(_int(q, key), w):>{w}}")
            elif key == "bytes":
                cells.append(f" {_short_size(_int(q, key), w):>{w}}")
            else:
                cells.append(f" {count(_int(q, key), w):>{w}}")
        state = ""
        if q.get("broken") is True:
            state = " broken"
        elif q.get("enabled") is False:
            state = " off"
        lines.append(clip(f"{name[:_NAME_WIDTH]:<{_NAME_WIDTH}}" + "".join(cells) + state))
    lines += _stats_lines(stats, _dict(reply, "control"))
    return "\n".join(lines)


def _pos_wrap(value: int | None, width: int) -> str:
    """A packed ring's position with its wrap counter (bit 15) as ``9w1``; the wrap counter is
    dropped when the position alone fills the column."""
    if value is None:
        return "-"
    text = f"{value & 0x7FFF}w{value >> 15 & 1}"
    return text if len(text) <= width else count(value & 0x7FFF, width)


def _stats_lines(stats: Mapping[str, Any], control: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    dev = _dict(stats, "device")
    totals = _dict(dev, "totals")
    irq = _dict(stats, "irq")
    lines += labelled("frames", [things(_int(totals, 'packets'), 'packet'),
                                 f"{count(_int(totals, 'map_errors'))} transient map errors",
                                 f"RX starved {count(_int(totals, 'no_buffers'))} times",
                                 f"{count(_int(dev, 'bad_accesses'))} bad BAR accesses"])
    held = [n for n in _list(dev, "rx_pool_held") if isinstance(n, int)]
    if held or "rx_pool" in dev:
        # RX chains popped and mapped for the next frames (harness.virtio.rxpool): in flight as
        # far as the driver can tell, so they also show in rxN's ``outstanding``.
        pool = [str(dev.get("rx_pool", "?"))[:8], things(sum(held), "chain") + " held"]
        if len(held) > 1:
            pool.append("per pair " + " ".join(count(n) for n in held))
        lines += labelled("rx pool", pool)
    holdoff = _int(dev, "tx_holdoff_us")
    if holdoff is not None:
        lines += labelled("tx hold", [f"{count(holdoff)} us",
                                      f"{count(_int(dev, 'tx_holdoffs'))} flushes held off"])
    if irq:
        lines += labelled("irq", [f"{count(_int(irq, 'sent'))} sent",
                                  f"{count(_int(irq, 'unwired'))} before QEMU wired them"])
    ledger = _dict(stats, "ledger")
    mapops = _dict(ledger, "mapops")
    if ledger:
        lines += labelled("map ops", [
            f"{mapops.get('mode', '?')}",
            f"{count(_int(ledger, 'maps'))} maps ({size(_int(ledger, 'map_bytes'))})",
            f"{count(_int(ledger, 'unmaps'))} unmaps",
            f"{count(_int(ledger, 'live'))} live (peak {count(_int(ledger, 'peak_live'))})",
            f"{count(_int(ledger, 'failed_maps'))} failed",
            f"syncs {count(_int(ledger, 'syncs_for_device'))} to device / "
            f"{count(_int(ledger, 'syncs_for_cpu'))} to cpu",
        ])
        violations = _dict(ledger, "violations")
        kinds = [f"{k} {count(_int(violations, k))}" for k in sorted(violations)
                 if _n(violations, k)]
        lines += labelled("ledger", [
            things(_int(ledger, 'violations_total'), 'violation'),
            *kinds,
            f"{count(_int(ledger, 'revocations'))} revocations",
            f"{count(_int(ledger, 'region_checks'))} region checks",
        ])
    space = _dict(ledger, "iova_space")
    dma = _dict(stats, "dma")
    if space or dma:
        parts = [things(_int(space, 'regions'), 'region'),
                 f"{size(_int(space, 'mapped_bytes'))} mapped",
                 f"free below 4 GiB {size(_int(space, 'free_below_4g'))}",
                 f"largest gap {size(_int(space, 'largest_free_below_4g'))}"]
        if dma:
            parts.append(f"peak {things(_int(dma, 'peak_regions'), 'region')}")
            parts.append(f"{count(_int(dma, 'maps'))} DMA_MAP / "
                         f"{count(_int(dma, 'unmaps'))} DMA_UNMAP")
        lines += labelled("iova", parts)
    if mapops.get("mode") == "bounce":
        domain = _dict(mapops, "domain")
        lines += labelled("bounce", [
            f"{count(_int(mapops, 'live_slots'))} live slots",
            f"{count(_int(mapops, 'allocated_pages'))} pages allocated",
            f"window {size(_int(mapops, 'window'))}",
            f"{count(_int(mapops, 'alloc_failures'))} alloc failures",
            f"{count(_int(mapops, 'deferred_pending'))} deferred erases",
            *(f"{k} {count(_int(domain, k))}" for k in sorted(domain) if _int(domain, k)),
        ])
    faults = _dict(ledger, "faults")
    if faults:
        injected = _dict(faults, "injected")
        parts = [str(faults.get("spec", "?")),
                 f"{count(_int(injected, 'mapping_error'))} mapping errors injected"]
        iova_alloc = _dict(injected, "iova_alloc")
        if iova_alloc:
            parts.append(f"{count(sum(_n(iova_alloc, k) for k in iova_alloc))} IOVA "
                         "allocations failed")
        lines += labelled("faults", parts)
    if control:
        parts = [things(_int(control, 'clients'), 'client'),
                 things(_int(control, 'requests'), 'request'),
                 things(_int(control, 'errors'), 'error')]
        last = control.get("last_error")
        if isinstance(last, str) and last:
            parts.append(f"last: {last}")
        lines += labelled("control", parts)
    return lines


# ---- the commands ---------------------------------------------------------------------------


def stats(run_dir: Path | None, device: str, *, as_json: bool = False,
          watch: float | None = None, out: TextIO | None = None,
          sleep: Callable[[float], None] | None = None) -> int:
    """`harness stats`: one table (or JSON reply), or one every ``watch`` s until Ctrl-C."""
    out = out if out is not None else sys.stdout
    sleep = sleep if sleep is not None else time.sleep
    path = find_control(run_dir, device)
    clear = watch is not None and not as_json and out.isatty()
    try:
        while True:
            reply = _ok(request(path, "stats"), "stats")
            if as_json:
                text = json.dumps(reply)
            else:
                text = render_stats(reply, device)
                if watch is not None:
                    text = (f"{device}: every {watch:g} s, Ctrl-C stops    "
                            f"{time.strftime('%H:%M:%S')}\n" + text)
            out.write(("\x1b[H\x1b[2J" if clear else "") + text + "\n")
            out.flush()
            if watch is None:
                return 0
            if not as_json and not clear:
                out.write("\n")
            sleep(watch)
    except KeyboardInterrupt:
        return 0


def link(run_dir: Path | None, device: str, up: bool, *, as_json: bool = False,
         out: TextIO | None = None) -> int:
    """`harness link up|down`: set ``device``'s link state; say the new state."""
    out = out if out is not None else sys.stdout
    path = find_control(run_dir, device)
    word = "up" if up else "down"
    reply = _ok(request(path, "link", up=up), f"link {word}")
    if as_json:
        out.write(json.dumps(reply) + "\n")
    else:
        state = "up" if reply.get("up") is True else "down" if reply.get("up") is False else "?"
        how = "" if reply.get("changed") is not False else " (it already was)"
        out.write(f"{device}: link {state}{how}\n")
    return 0


def announce(run_dir: Path | None, device: str, *, as_json: bool = False,
             out: TextIO | None = None) -> int:
    """`harness announce`: ask ``device``'s driver to announce itself (VIRTIO_NET_S_ANNOUNCE)."""
    out = out if out is not None else sys.stdout
    reply = _ok(request(find_control(run_dir, device), "announce"), "announce")
    if as_json:
        out.write(json.dumps(reply) + "\n")
    else:
        out.write(f"{device}: announce requested ({reply.get('announces')} so far)\n")
    return 0


def dump_queue(run_dir: Path | None, device: str, queue: int, *, as_json: bool = False,
               out: TextIO | None = None) -> int:
    """`harness dump-queue N`: queue N of ``device`` decoded (or the JSON reply)."""
    out = out if out is not None else sys.stdout
    path = find_control(run_dir, device)
    reply = _ok(request(path, "dump-queue", queue=queue), f"dump-queue {queue}")
    if as_json:
        out.write(json.dumps(reply) + "\n")
    else:
        out.write(render_dump(_dict(reply, "dump"), device) + "\n")
    return 0
