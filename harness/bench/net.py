"""``harness bench net``: our vfio-user virtio-net device against QEMU's built-in virtio-net-pci.

Rounds alternate sides (ours, builtin, ours with the ledger off, ours with ``--ab``) so that a
noisy host (another VM booting, CPU frequency) hurts all alike, and each round starts one side
later than the one before (round 2: builtin, ours-noledger, ours-ab, ours), so that no side
always boots in the same place, e.g. always right after the built-in one. Each round is a
fresh Testbed with the same accelerator, vCPUs, memory, kernel, initramfs and host peer; only
the network device differs (the builtin side is QEMU's own virtio-net-pci on a TAP without
vhost in the run's namespace, same MAC, same offloads, modern-only like ours). ``--config``
runs several configurations (plain, offloads, viommu: both devices behind the same
intel-iommu) in one run.
harness.bench.netrun runs one round; the workloads, all measured inside the guest:

- ``tcp_guest_to_host`` / ``tcp_host_to_guest``: hnet's TCP bulk throughput (Mbit/s), every
  byte checked by the host peer or by hnet (``--bytes``, 16 MiB; ``--full``: 64 MiB);
- ``udp_pps_guest_to_host``: 64-byte UDP datagrams per second that reached the host peer;
- ``udp_pps_host_to_guest``: datagrams per second hnet received from a paced host flood
  (``--rate`` offered, 50,000/s: a figure at the offered rate means "at least");
- ``tcp_rr``: TCP request/response transactions per second, 1-byte (``--rr-size``);
- ``ping_rtt``: ping's average round-trip time (20 pings, 0.1 s apart).

Around each workload the device server's and QEMU's CPU time are read from /proc, giving CPU
per MiB (TCP) or per packet/transaction; the ledger-off side gives the checks' cost. The device
server's DMA_MAP/UNMAP reply latency (p50/p99) comes from its stats (harness.vfu.latency).

The ratio always reads "how many times better ours is": ours/builtin for rates, builtin/ours for
RTT, so > 1 favours ours everywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness import argtypes, paths, proc
from harness.bench import wakeup
from harness.bench.netrun import CONFIGS, MIB, Options, Round, py_spy, run_round
from harness.progress import Progress
from harness.server import switches

__all__ = ["WORKLOADS", "Options", "Round", "Workload", "main", "median", "ratio", "summarize",
           "table"]

SIDES = ("ours", "builtin", "ours-noledger", "ours-ab")
_SHORT = {"ours": "ours", "builtin": "bi", "ours-noledger": "nl", "ours-ab": "ab", "plain": "p",
          "offloads": "o", "viommu": "v", "viommu+offloads": "vo"}


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    unit: str
    higher_is_better: bool
    cpu_unit: str = ""  # what the CPU cost is given in ("" = none)


WORKLOADS = (
    Workload("tcp_guest_to_host", "TCP guest->host", "Mbit/s", True, "ms/MiB"),
    Workload("tcp_host_to_guest", "TCP host->guest", "Mbit/s", True, "ms/MiB"),
    Workload("udp_pps_guest_to_host", "UDP 64B g->h", "pkt/s", True, "us/pkt"),
    Workload("udp_pps_host_to_guest", "UDP 64B h->g", "pkt/s", True, "us/pkt"),
    Workload("tcp_rr", "TCP RR", "trans/s", True, "us/tr"),
    Workload("ping_rtt", "ping RTT (avg)", "ms", False, "us/ping"),
)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(ours: float | None, builtin: float | None, higher_is_better: bool) -> float | None:
    """How many times better ours is (> 1: ours wins); None without both numbers."""
    if ours is None or builtin is None:
        return None
    num, den = (ours, builtin) if higher_is_better else (builtin, ours)
    return num / den if den > 0 else None


def _med(rounds: Sequence[Round], side: str, get: Any) -> tuple[float | None, list[float]]:
    samples = [v for r in rounds if r.side == side for v in [get(r)] if v is not None]
    return median(samples), samples


def paired_wins(rounds: Sequence[Round], name: str, higher_is_better: bool,
                a_side: str = "ours", b_side: str = "ours-ab") -> list[int]:
    """[wins, pairs]: in how many rounds side ``b_side`` (the ``--ab`` one) beat ``a_side``
    (ours) booted in the same round index (both measured): how to read a ratio of medians
    that is inside the run's noise."""
    a = {r.index: r.values.get(name) for r in rounds if r.side == a_side}
    b = {r.index: r.values.get(name) for r in rounds if r.side == b_side}
    pairs = [(x, y) for i in sorted(a.keys() & b.keys())
             for x, y in [(a[i], b[i])] if x is not None and y is not None]
    wins = [y > x if higher_is_better else y < x for x, y in pairs]
    return [wins.count(True), len(pairs)]


def summarize(rounds: Sequence[Round]) -> list[dict[str, Any]]:
    """One object per config and workload: medians per side, the ratio, the ledger-off
    figure, CPU costs and the samples; then per config the DMA_MAP/UNMAP latencies."""
    out: list[dict[str, Any]] = []
    configs = list(dict.fromkeys(r.config for r in rounds))
    for config in configs:
        rs = [r for r in rounds if r.config == config]
        for w in WORKLOADS:
            med = {s: _med(rs, s, lambda r, w=w: r.values.get(w.name)) for s in SIDES}
            cpu = {f"{s}_{who}": _med(rs, s, lambda r, w=w, who=who:
                                      r.cpu.get(w.name, {}).get(who))[0]
                   for s in SIDES for who in ("server", "qemu")}
            ours, builtin, off = med["ours"][0], med["builtin"][0], med["ours-noledger"][0]
            ab = med["ours-ab"][0]
            out.append({
                "config": config, "workload": w.name, "unit": w.unit,
                "better": "higher" if w.higher_is_better else "lower",
                "ours": ours, "builtin": builtin,
                "ratio": ratio(ours, builtin, w.higher_is_better),
                # Rounds in which ours beat the built-in device of the same round.
                "wins": paired_wins(rs, w.name, w.higher_is_better, "builtin", "ours"),
                "ours_ledger_off": off,
                # > 1: the ledger costs that factor (ledger-off is that much better).
                "ledger_cost": ratio(off, ours, w.higher_is_better),
                # --ab: B (ours-ab) against A (ours), > 1: B is better.
                "ours_ab": ab, "ab_ratio": ratio(ab, ours, w.higher_is_better),
                "ab_wins": paired_wins(rs, w.name, w.higher_is_better),
                "cpu_unit": w.cpu_unit or None,
                "cpu": {k: v for k, v in cpu.items() if v is not None} if w.cpu_unit else {},
                "samples": {s: med[s][1] for s in SIDES},
            })
        for kind in ("map_reply", "unmap_reply", "map_callback", "unmap_callback",
                     "map_queue", "unmap_queue", "map_queue_woke", "map_queue_busy",
                     "unmap_queue_woke", "unmap_queue_busy", "map_library", "unmap_library",
                     "map_apply"):
            # Medians over the ours rounds of each round's p50, p99 and count.
            p50, p99, count = (_med(rs, "ours", lambda r, kind=kind, q=q:
                                    r.dma_latency.get(kind, {}).get(q))
                               for q in ("p50_us", "p99_us", "count"))
            if count[0]:
                out.append({"config": config, "workload": f"dma_{kind}", "unit": "us",
                            "better": "lower", "ours": p50[0], "p99": p99[0],
                            "count": count[0], "builtin": None, "ratio": None,
                            "samples": {"ours": p50[1], "ours_p99": p99[1]}})
    return out


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else (
        f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}")


def table(summary: Sequence[dict[str, Any]], rounds: int) -> str:
    """The side-by-side tables, one per config (fit 80 columns)."""
    labels = {w.name: w.label for w in WORKLOADS}
    lines: list[str] = []
    for config in dict.fromkeys(row["config"] for row in summary):
        offloads, viommu = CONFIGS.get(config, (False, False))
        lines.append(f"[{config}] offloads {'on' if offloads else 'off'}, vIOMMU "
                     f"{'on' if viommu else 'off'}")
        lines.append(f"{'workload':<16}{'unit':<8}{'ours':>8}{'builtin':>9}{'ratio':>7}"
                     f"{'won':>5}{'no-ledger':>10}  {'server CPU':>14}")
        lines.append("-" * 77)
        for row in summary:
            if row["config"] != config:
                continue
            name = row["workload"]
            if name.startswith("dma_"):
                lines.append(f"{name:<24}p50 {_num(row['ours'])} us, p99 {_num(row['p99'])} "
                             f"us, {row['count']:.0f} calls")
                continue
            r = row["ratio"]
            wins, pairs = row.get("wins", [0, 0])
            won = f"{wins}/{pairs}" if pairs else "-"
            srv = row["cpu"].get("ours_server")
            cpu = f"{_num(srv)} {row['cpu_unit']}" if srv is not None else "-"
            lines.append(f"{labels.get(name, name):<16}{row['unit']:<8}{_num(row['ours']):>8}"
                         f"{_num(row['builtin']):>9}{'-' if r is None else f'{r:.2f}x':>7}"
                         f"{won:>5}{_num(row['ours_ledger_off']):>10}  {cpu:>14}")
        ab = [row for row in summary if row["config"] == config and row.get("ab_ratio")]
        if ab:
            lines.append(f"{'A/B':<24}{'A (ours)':>10}{'B (--ab)':>10}{'B/A':>7}"
                         f"{'B better':>10}")
            for row in ab:
                wins, pairs = row.get("ab_wins", [0, 0])
                lines.append(f"{labels.get(row['workload'], row['workload']):<24}"
                             f"{_num(row['ours']):>10}{_num(row['ours_ab']):>10}"
                             f"{row['ab_ratio']:>6.2f}x{f'{wins}/{pairs}':>10}")
        lines.append("")
    lines.append(f"medians of {rounds} round(s) per side; ratio > 1 favours ours (ours/builtin")
    lines.append("for rates, builtin/ours for RTT); won: rounds in which ours beat the built-in")
    lines.append("device of the same round; no-ledger: ours with HARNESS_LEDGER=off")
    if any(row.get("ab_ratio") for row in summary):
        lines.append("B better: rounds in which --ab's boot beat ours of the same round")
    return "\n".join(lines)


def _describe(rnd: Round) -> str:
    v = rnd.values
    head = f"{rnd.config} {rnd.side} #{rnd.index}: "
    if rnd.error and not v:
        return head + f"FAILED {rnd.error}"
    parts = [f"{short} {v[k]:.0f}" for k, short in
             (("tcp_guest_to_host", "g->h Mbit/s"), ("tcp_host_to_guest", "h->g Mbit/s"),
              ("udp_pps_guest_to_host", "udp g->h pps"), ("udp_pps_host_to_guest",
                                                          "udp h->g pps"),
              ("tcp_rr", "rr/s")) if k in v]
    if "ping_rtt" in v:
        parts.append(f"rtt {v['ping_rtt']:.2f} ms")
    return head + ", ".join(parts) + (" (errors)" if rnd.error else "")


def side_order(sides: Sequence[str], index: int) -> list[str]:
    """The boot order of round ``index`` (from 1): ``sides`` rotated by index - 1, so over as
    many rounds as there are sides every side boots once in every position."""
    k = (index - 1) % len(sides) if sides else 0
    return [*sides[k:], *sides[:k]]


def run(opts: Options, progress: Progress) -> list[Round]:
    from harness.guest.agent import AgentError
    from harness.testbed import select_accel
    from harness.vm.machine import MachineError

    env = paths.load_env()
    accel = select_accel(opts.accel, env)
    base = paths.new_run_dir(opts.out or paths.build_dir() / "bench-net")
    progress.note(f"accelerator {accel.name}; runs in {base}")
    sides = [s for s in SIDES if (s != "ours-noledger" or opts.ledger_side)
             and (s != "ours-ab" or opts.ab_env)]
    rounds = []
    for config in opts.configs:
        for i in range(1, opts.rounds + 1):
            for side in side_order(sides, i):
                # Short: the sockets in it must fit AF_UNIX's 108 bytes under deep --out.
                run_dir = base / f"{i:02d}{_SHORT[config]}-{_SHORT[side]}"
                run_dir.mkdir()
                try:
                    rnd = run_round(side, i, config, opts, run_dir, env, accel)
                except (MachineError, AgentError, RuntimeError, TimeoutError, OSError) as exc:
                    rnd = Round(side, i, config, str(run_dir),
                                error=(str(exc).splitlines() or [repr(exc)])[0])
                rounds.append(rnd)
                progress.step(_describe(rnd))
    (base / "rounds.json").write_text(json.dumps([r.__dict__ for r in rounds], indent=2) + "\n")
    return rounds


def _configs(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown config {', '.join(bad) or '(none)'} (known: {', '.join(CONFIGS)})")
    return names


def _env_list(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in text.split(","):
        key, eq, value = item.strip().partition("=")
        if not eq or not key.startswith("HARNESS_") or not key.replace("_", "").isalnum():
            raise argparse.ArgumentTypeError(f"not HARNESS_NAME=VALUE: {item.strip()!r}")
        try:
            switches.check(key, value)  # a name or value the server would refuse, refused now
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        pairs.append((key, value))
    return tuple(pairs)


def _host_wakeup() -> tuple[str, wakeup.Wakeup | None]:
    """harness.bench.wakeup's line and figures (a failed probe is said, not fatal: the bench
    goes on without them)."""
    try:
        w = wakeup.measure()
    except (RuntimeError, OSError) as exc:
        return f"host wake-up: not measured ({exc})", None
    return wakeup.line(w), w


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="harness bench net",
                                description=__doc__.split("\n")[0].split(": ", 1)[-1])
    p.add_argument("--rounds", type=argtypes.positive_int, default=3,
                   help="boots per side and config, alternating (default 3)")
    p.add_argument("--bytes", type=argtypes.size, default=None, metavar="SIZE",
                   help="TCP stream length each way (default 16M; 64M with --full)")
    p.add_argument("--seconds", type=float, default=None,
                   help="length of each UDP and RR workload (default 2; 5 with --full)")
    p.add_argument("--full", action="store_true", help="64 MiB TCP, 5 s per rate workload")
    p.add_argument("--rr-size", type=argtypes.positive_int, default=1, metavar="BYTES",
                   help="request and response size of tcp_rr (default 1)")
    p.add_argument("--rate", type=argtypes.positive_int, default=50_000,
                   help="offered host->guest UDP datagrams per second (default 50000)")
    p.add_argument("--config", type=_configs, default=None, metavar="LIST",
                   help=f"comma-separated, from {', '.join(CONFIGS)} (default plain, or what "
                        "--viommu/--offloads say)")
    p.add_argument("--viommu", action="store_true", help="both devices behind an intel-iommu")
    p.add_argument("--offloads", action="store_true",
                   help="both devices offer checksum and TSO offloads")
    p.add_argument("--no-ledger-side", action="store_true",
                   help="skip the ledger-off boots (no ledger cost figures)")
    p.add_argument("--ab", type=_env_list, default=(), metavar="KEY=VALUE[,...]",
                   help="also boot ours with these environment variables (a paired A/B of "
                        "a device server knob, e.g. HARNESS_LOOP_POLL_US=100)")
    p.add_argument("--append", default="", metavar="ARGS",
                   help="extra guest kernel command-line words on every side (e.g. "
                        "iommu.strict=0: the vIOMMU's lazy invalidation, the kernel's default; "
                        "the harness boots strict)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    p.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                   help="per round (default 900)")
    p.add_argument("--out", type=Path, help="parent directory for the runs (default "
                                                  "build/bench-net)")
    p.add_argument("--json", action="store_true", help="one JSON object per workload")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="sample our device server with py-spy during each workload (ours "
                        "and --ab sides; the latter as *-ab-*), collapsed stacks into DIR "
                        "(see docs/PERFORMANCE.md)")
    args = p.parse_args(argv)
    if args.profile is not None and py_spy() is None:
        p.error("--profile needs py-spy (.venv/bin/pip install py-spy)")
    if args.seconds is not None and not 0 < args.seconds <= 60:
        p.error("--seconds must be in (0, 60]")
    configs = args.config or (("viommu+offloads" if args.offloads else "viommu",)
                              if args.viommu else ("offloads",) if args.offloads
                              else ("plain",))
    opts = Options(rounds=args.rounds, configs=configs, rr_size=args.rr_size, rate=args.rate,
                   ledger_side=not args.no_ledger_side, accel=args.accel,
                   timeout=args.timeout, out=args.out, profile=args.profile,
                   ab_env=args.ab, append=tuple(args.append.split()))
    opts = replace(opts, nbytes=args.bytes or (64 * MIB if args.full else opts.nbytes),
                   seconds=args.seconds or (5.0 if args.full else opts.seconds))
    total = len(configs) * opts.rounds * (2 + opts.ledger_side + bool(opts.ab_env))
    try:
        with proc.interrupts(), Progress("bench net", total=total) as progress:
            # What a wake-up costs here, measured before any boot: RR and ping ratios read
            # against it (ours makes wake-ups the built-in device does not).
            host, host_figures = _host_wakeup()
            progress.note(host)
            rounds = run(opts, progress)
    except (paths.EnvError, ValueError) as exc:
        print(f"harness bench net: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return proc.report_interrupted("harness bench net", exc)
    summary = summarize(rounds)
    if args.json:
        # The host's wake-up cost as one more row (config "host"), when it was measured.
        extra = ([] if host_figures is None else
                 [{"config": "host", "workload": "wakeup", "unit": "us", **host_figures}])
        print(json.dumps(summary + extra, indent=2))
    else:
        print(table(summary, opts.rounds))
        print(host)
        if opts.append:
            print(f"guest kernel words added on every side: {' '.join(opts.append)}")
    for r in rounds:
        if r.error:
            print(f"{r.config} {r.side} #{r.index}: {r.error} ({r.run_dir})", file=sys.stderr)
    return 1 if any(r.error for r in rounds) else 0
