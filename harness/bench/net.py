"""``harness bench net``: our vfio-user virtio-net device against QEMU's built-in virtio-net-pci.

Rounds alternate (ours, builtin, ours, builtin, ...) so that a noisy host (another VM booting,
CPU frequency) hurts both sides alike. Each round is a fresh Testbed with the same accelerator,
vCPUs, memory, kernel, initramfs and guest plan; only the network device differs (the builtin
side is QEMU's own virtio-net-pci on a TAP in the run's namespace, ``TestbedConfig(device=
"builtin")``, with the same MAC, the same offloads and modern-only like ours). The guest runs
``link_up,ping_host,tcp_guest_to_host,tcp_host_to_guest`` with ``harness.bytes=--bytes``.

Workloads (medians over the rounds):

- ``tcp_guest_to_host`` / ``tcp_host_to_guest``: the guest's hnet throughput (Mbit/s), whose
  bytes the host peer checked (a failed test gives no number);
- ``ping_rtt``: ping_host's rtt_avg_ms (5 pings);
- ``qemu_cpu``: QEMU's CPU time (utime+stime from /proc) across the two TCP tests, per MiB
  moved (both directions): vCPUs (TCG) plus, on the builtin side, QEMU's device model;
- ``server_cpu``: our device process's CPU time across the same window per MiB (ours only).

The ratio always reads "how many times better ours is": ours/builtin for throughput,
builtin/ours for RTT and CPU time, so > 1 favours ours everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import argtypes, paths, proc
from harness.progress import Progress

__all__ = ["WORKLOADS", "Round", "Workload", "main", "median", "ratio", "summarize", "table"]

MIB = 1 << 20
SIDES = ("ours", "builtin")
PLAN = "link_up,ping_host,tcp_guest_to_host,tcp_host_to_guest"
DONE_MARKER = "# harness: done"


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    unit: str
    higher_is_better: bool


WORKLOADS = (
    Workload("tcp_guest_to_host", "TCP guest->host", "Mbit/s", True),
    Workload("tcp_host_to_guest", "TCP host->guest", "Mbit/s", True),
    Workload("ping_rtt", "ping RTT (avg)", "ms", False),
    Workload("qemu_cpu", "QEMU CPU per MiB", "ms/MiB", False),
    Workload("server_cpu", "device server CPU/MiB", "ms/MiB", False),
)


@dataclass
class Round:
    """One boot of one side: its numbers (by workload name), or why it has none."""

    side: str
    index: int
    run_dir: str = ""
    values: dict[str, float] = field(default_factory=dict)
    error: str = ""
    #: The network device as QEMU's query-pci saw it (driver, ids): which device really ran.
    device: dict[str, Any] = field(default_factory=dict)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(ours: float | None, builtin: float | None, higher_is_better: bool) -> float | None:
    """How many times better ours is (> 1: ours wins); None without both numbers."""
    if ours is None or builtin is None:
        return None
    num, den = (ours, builtin) if higher_is_better else (builtin, ours)
    return num / den if den > 0 else None


def summarize(rounds: Sequence[Round]) -> list[dict[str, Any]]:
    """One object per workload: medians of each side, the ratio, and the samples."""
    out = []
    for w in WORKLOADS:
        samples = {side: [r.values[w.name] for r in rounds if r.side == side
                          and w.name in r.values] for side in SIDES}
        ours, builtin = median(samples["ours"]), median(samples["builtin"])
        out.append({"workload": w.name, "unit": w.unit,
                    "better": "higher" if w.higher_is_better else "lower",
                    "ours": ours, "builtin": builtin,
                    "ratio": ratio(ours, builtin, w.higher_is_better),
                    "samples": samples})
    return out


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"


def table(summary: Sequence[dict[str, Any]], rounds: int) -> str:
    """The side-by-side table (fits 80 columns)."""
    labels = {w.name: w.label for w in WORKLOADS}
    lines = [f"{'workload':<24}{'unit':<8}{'ours':>10}{'builtin':>10}{'ratio':>8}  better",
             "-" * 68]
    for row in summary:
        r = row["ratio"]
        lines.append(f"{labels.get(row['workload'], row['workload']):<24}{row['unit']:<8}"
                     f"{_num(row['ours']):>10}{_num(row['builtin']):>10}"
                     f"{'-' if r is None else f'{r:.2f}x':>8}  {row['better']}")
    lines.append(f"medians of {rounds} round(s) per side; ratio > 1 favours ours "
                 "(ours/builtin")
    lines.append("for throughput, builtin/ours for RTT and CPU time)")
    return "\n".join(lines)


def _cpu_ticks(pid: int | None) -> int | None:
    """utime + stime of a live process, in clock ticks (None if it is gone)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def _pci_device(reply: object, qdev_id: str = "net0") -> dict[str, Any]:
    """The query-pci entry of the network device: its ids, class and QEMU's description."""
    for bus in reply if isinstance(reply, list) else []:
        for dev in bus.get("devices", []):
            if dev.get("qdev_id") == qdev_id:
                ids = dev.get("id", {})
                return {"qdev_id": qdev_id, "description": dev.get("class_info", {}).get("desc"),
                        **{k: f"{v:#06x}" for k, v in ids.items() if isinstance(v, int)}}
    return {}


@dataclass(frozen=True)
class Options:
    rounds: int = 3
    nbytes: int = 64 * MIB
    viommu: bool = False
    offloads: bool = False
    accel: str = "auto"
    timeout: float = 900.0
    out: Path | None = None


def _round(side: str, index: int, opts: Options, run_dir: Path, env: paths.Env,
           accel: Any) -> Round:
    from harness.runner import _RESULT
    from harness.testbed import PeerSpec, Testbed, TestbedConfig
    from harness.vm import ktap

    rnd = Round(side, index, str(run_dir))
    cfg = TestbedConfig(accel=opts.accel, viommu=opts.viommu, offloads=opts.offloads,
                        device=side, peers=PeerSpec(tcp_bytes=opts.nbytes, udp_count=1),
                        cmdline=(f"harness.plan={PLAN}", f"harness.bytes={opts.nbytes}"))
    tick_ms = 1000.0 / os.sysconf("SC_CLK_TCK")
    marks: dict[str, dict[str, int | None]] = {}
    with Testbed(cfg, run_dir, env=env, accel=accel) as tb:
        pids = {"qemu_cpu": tb.machine.pid,
                "server_cpu": tb.device.proc.pid if side == "ours" else None}
        rnd.device = _pci_device(tb.qmp("query-pci"))
        rnd.device["type"] = tb.qmp("qom-get", path="/machine/peripheral/net0", property="type")
        deadline = time.monotonic() + opts.timeout
        while True:
            text = tb.console_text()
            seen = {name for _s, _n, name, _r in _RESULT.findall(text)}
            for mark, after in (("start", "ping_host"), ("end", "tcp_host_to_guest")):
                if after in seen and mark not in marks:
                    marks[mark] = {k: _cpu_ticks(p) for k, p in pids.items()}
            if DONE_MARKER in text or not tb.machine.running():
                break
            tb.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest did not finish within {opts.timeout:.0f} s")
            time.sleep(0.1)
        tb.machine.wait(30)
        tb.machine.shutdown()
        if side == "ours":
            tb.device.wait(30)
        text = tb.console_text()
    report = ktap.parse(text)
    results = report.by_name()
    failed = []
    for name in ("tcp_guest_to_host", "tcp_host_to_guest", "ping_host"):
        test = results.get(name)
        if test is None or test.status is not ktap.Status.PASS:
            failed.append(f"{name}: {test.reason if test else 'no result'}")
            continue
        metrics = report.metrics.get(name, {})
        key = "rtt_avg_ms" if name == "ping_host" else "mbps"
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            rnd.values["ping_rtt" if name == "ping_host" else name] = float(value)
    moved_mib = 2 * opts.nbytes / MIB
    if not failed and "start" in marks and "end" in marks:
        for key in ("qemu_cpu", "server_cpu"):
            a, b = marks["start"][key], marks["end"][key]
            if a is not None and b is not None:
                rnd.values[key] = (b - a) * tick_ms / moved_mib
    rnd.error = "; ".join(failed)
    return rnd


def _describe(rnd: Round) -> str:
    v = rnd.values
    if rnd.error and not v:
        return f"{rnd.side} #{rnd.index}: FAILED {rnd.error}"
    parts = [f"{short} {v[k]:.0f} Mbit/s" for k, short in
             (("tcp_guest_to_host", "g->h"), ("tcp_host_to_guest", "h->g")) if k in v]
    if "ping_rtt" in v:
        parts.append(f"rtt {v['ping_rtt']:.2f} ms")
    return f"{rnd.side} #{rnd.index}: " + ", ".join(parts) + (" (errors)" if rnd.error else "")


def run(opts: Options, progress: Progress) -> list[Round]:
    from harness.testbed import select_accel
    from harness.vm.machine import MachineError

    env = paths.load_env()
    accel = select_accel(opts.accel, env)
    base = paths.new_run_dir(opts.out or paths.build_dir() / "bench-net")
    progress.note(f"accelerator {accel.name}; runs in {base}")
    rounds = []
    for i in range(1, opts.rounds + 1):
        for side in SIDES:
            run_dir = base / f"{i:02d}-{side}"
            run_dir.mkdir()
            try:
                rnd = _round(side, i, opts, run_dir, env, accel)
            except (MachineError, RuntimeError, TimeoutError, OSError) as exc:
                rnd = Round(side, i, str(run_dir), error=str(exc).splitlines()[0])
            rounds.append(rnd)
            progress.step(_describe(rnd))
    (base / "rounds.json").write_text(json.dumps([r.__dict__ for r in rounds], indent=2) + "\n")
    return rounds


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="harness bench net", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=argtypes.positive_int, default=3,
                   help="boots per side, alternating (default 3)")
    p.add_argument("--bytes", type=argtypes.size, default=64 * MIB, metavar="SIZE",
                   help="TCP stream length each way (default 64M)")
    p.add_argument("--viommu", action="store_true", help="both devices behind an intel-iommu")
    p.add_argument("--offloads", action="store_true",
                   help="both devices offer checksum and TSO offloads")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    p.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                   help="per round (default 900)")
    p.add_argument("--out", type=Path, help="parent directory for the runs (default "
                                            "build/bench-net)")
    p.add_argument("--json", action="store_true", help="one JSON object per workload")
    args = p.parse_args(argv)
    opts = Options(rounds=args.rounds, nbytes=args.bytes, viommu=args.viommu,
                   offloads=args.offloads, accel=args.accel, timeout=args.timeout,
                   out=args.out)
    try:
        with proc.interrupts(), Progress("bench net", total=2 * opts.rounds) as progress:
            rounds = run(opts, progress)
    except (paths.EnvError, ValueError) as exc:
        print(f"harness bench net: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        done = ", ".join(proc.cleanup_journal) or "nothing was running"
        print(f"harness bench net: interrupted, cleaned up: {done}", file=sys.stderr)
        return proc.exit_status(exc)
    summary = summarize(rounds)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(table(summary, opts.rounds))
    for r in rounds:
        if r.error:
            print(f"{r.side} #{r.index}: {r.error} ({r.run_dir})", file=sys.stderr)
    return 1 if any(r.error for r in rounds) else 0
