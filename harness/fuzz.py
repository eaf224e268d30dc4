"""`harness fuzz`: seeded in-guest fuzzing of the device through the raw driver.

One guest boots with our device (a Testbed); the raw driver's fuzz mode
(`vnetraw fuzz`, guest/src/vnetfuzz.h) runs in batches of B iterations through the guest agent.
After each batch the host checks what the guest cannot: the device server is alive and printed
no traceback, and its DMA ledger counted no access outside a mapping. The ledger *refuses*
(counts, never performs) a map of an address, length or direction the guest supplied that no
mapping allows: the fuzzer hands out such addresses on purpose, so those kinds
(`REFUSED_KINDS`) are reported but are not failures; every other kind (a leak, a use after
unmap, a region mismatch, ...) is the device touching memory it must not, and fails the run.
At the end a reset device must pass verified UDP echoes again.

A failure names the seed, the iterations and the exact command that repeats them alone:
iteration I of seed S is a pure function of (S, I) in the guest, so
`harness fuzz --seed S --first I --iterations 1` reproduces it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import argtypes

#: Ledger kinds that are refusals of guest-supplied addresses (harness.dma.ledger): expected.
REFUSED_KINDS = frozenset({"unmapped_iova", "out_of_bounds", "descriptor_direction",
                           "read_only_region", "too_large"})
#: The guest's UDP schedule for the traffic check after the last reset.
TRAFFIC_SEED = 11


@dataclass(frozen=True)
class FuzzConfig:
    """One fuzz run: iterations [first, first + iterations) of seed, in batches."""

    iterations: int
    seed: int = 1
    first: int = 0
    batch: int = 1000
    kernel: Path | None = None
    accel: str = "auto"
    out_dir: Path | None = None
    #: Seconds: start no batch after this (make test's time budget); None: run them all.
    budget: float | None = None
    echoes: int = 20


@dataclass
class FuzzResult:
    """What a run did and found; `ok` is the verdict."""

    seed: int
    first: int
    planned: int
    done: int = 0
    batches: int = 0
    crashes: int = 0
    server_tracebacks: int = 0
    out_of_mapping: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    needs_reset: int = 0
    unsafe_enables: int = 0
    elapsed: float = 0.0
    traffic: str = "not run"
    failure: str | None = None
    #: (first, count) of the iterations to repeat when something failed.
    failed_range: tuple[int, int] | None = None
    run_dir: str = ""

    @property
    def ok(self) -> bool:
        return (self.failure is None and self.crashes == 0 and self.server_tracebacks == 0
                and not self.out_of_mapping and self.traffic.startswith("ok"))

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


def parse_kv(text: str) -> dict[str, str]:
    """The last stdout line of vnetraw: key=value words."""
    lines = text.strip().splitlines()
    return dict(w.split("=", 1) for w in (lines[-1] if lines else "").split() if "=" in w)


def violation_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Ledger violations counted between two stats() snapshots, by kind."""
    v0 = before.get("ledger", {}).get("violations", {})
    v1 = after.get("ledger", {}).get("violations", {})
    return {str(k): int(n) - int(v0.get(k, 0)) for k, n in v1.items()
            if int(n) != int(v0.get(k, 0))}


def split_violations(delta: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(refused guest addresses, accesses outside a mapping) of one delta."""
    refused = {k: n for k, n in delta.items() if k in REFUSED_KINDS}
    bad = {k: n for k, n in delta.items() if k not in REFUSED_KINDS}
    return refused, bad


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for k, n in more.items():
        into[k] = into.get(k, 0) + n


def reproduce_command(seed: int, first: int, count: int, kernel: Path | None = None) -> str:
    extra = f" --kernel {kernel}" if kernel is not None else ""
    return f"harness fuzz --seed {seed} --first {first} --iterations {count}{extra}"


def batches(first: int, iterations: int, batch: int) -> list[tuple[int, int]]:
    """(first, count) of each batch."""
    end = first + iterations
    return [(i, min(batch, end - i)) for i in range(first, end, batch)]


def summary(r: FuzzResult, kernel: Path | None = None) -> str:
    """The table printed at the end of `harness fuzz`."""
    def kinds(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {n}" for k, n in sorted(d.items())) or "-"

    rows = [
        ("verdict", "PASS" if r.ok else "FAIL"),
        ("seed", str(r.seed)),
        ("iterations", f"{r.done} of {r.planned} (from {r.first}, {r.batches} batches)"),
        ("crashes (server died)", str(r.crashes)),
        ("server tracebacks", str(r.server_tracebacks)),
        ("out-of-mapping accesses", f"{sum(r.out_of_mapping.values())} "
                                    f"({kinds(r.out_of_mapping)})"),
        ("refused guest addresses", f"{sum(r.refused.values())} ({kinds(r.refused)})"),
        ("iterations ending NEEDS_RESET", str(r.needs_reset)),
        ("enables skipped (unsafe rings)", str(r.unsafe_enables)),
        ("elapsed", f"{r.elapsed:.0f} s"),
        ("iterations/s", f"{r.rate:.1f}"),
        ("traffic after reset", r.traffic),
        ("run directory", r.run_dir),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    if r.failure is not None:
        out.append(f"FAILED: {r.failure}")
    if r.failed_range is not None:
        first, count = r.failed_range
        out.append(f"seed {r.seed}, iterations {first}..{first + count - 1}; reproduce with:")
        out.append(f"  {reproduce_command(r.seed, first, count, kernel)}")
    return "\n".join(out)


def _traceback_count(log: Path, start: int) -> int:
    try:
        with log.open("rb") as f:
            f.seek(start)
            return f.read().count(b"Traceback (most recent call last)")
    except OSError:
        return 0


def run_fuzz(cfg: FuzzConfig, note: Callable[[str], None] = lambda _s: None) -> FuzzResult:
    """Boot a guest with our device, then `fuzz_on` it."""
    from harness import paths
    from harness.testbed import SHELL_CMDLINE, PeerSpec, Testbed, TestbedConfig

    run_dir = paths.new_run_dir(cfg.out_dir or paths.build_dir() / "fuzz")
    tb_cfg = TestbedConfig(accel=cfg.accel, kernel=cfg.kernel, cmdline=SHELL_CMDLINE,
                           peers=PeerSpec(udp_count=1_000_000, seed=TRAFFIC_SEED))
    with Testbed(tb_cfg, run_dir) as tb:
        tb.wait_shell(180)
        note(f"guest up ({tb.accel.name}); run directory {run_dir}")
        return fuzz_on(tb, cfg, note)


def run_batch(tb: Any, seed: int, first: int, count: int) -> tuple[int, dict[str, str], str]:
    """One `vnetraw fuzz` in the guest: (exit status, its key=value line, its stderr)."""
    from harness.guest.agent import AgentError

    cmd = f"vnetraw fuzz --seed {seed} --first {first} --iterations {count} --progress 0"
    try:
        r = tb.guest.run(cmd, timeout=int(120 + count * 0.5))
    except AgentError as exc:
        return -1, {}, f"guest agent: {exc}"
    return r.returncode, parse_kv(r.text), r.stderr.decode(errors="replace").strip()


def fuzz_on(tb: Any, cfg: FuzzConfig, note: Callable[[str], None] = lambda _s: None,
            ) -> FuzzResult:
    """Fuzz batch by batch on a running Testbed (a SHELL_CMDLINE guest whose host peer runs
    the TRAFFIC_SEED schedule), with the checks after each batch, then the traffic check."""
    from harness.testbed import ServerDied

    result = FuzzResult(seed=cfg.seed, first=cfg.first, planned=cfg.iterations,
                        run_dir=str(tb.run_dir))
    started = time.monotonic()
    log_at = tb.device.log.stat().st_size
    last = tb.device.stats()
    slowest = 0.0
    for first, count in batches(cfg.first, cfg.iterations, cfg.batch):
        elapsed = time.monotonic() - started
        if cfg.budget is not None and result.batches and elapsed + slowest > cfg.budget:
            break
        t0 = time.monotonic()
        rc, kv, err = run_batch(tb, cfg.seed, first, count)
        slowest = max(slowest, time.monotonic() - t0)
        result.batches += 1
        result.done += int(kv.get("iterations", 0))
        result.needs_reset += int(kv.get("needs_reset", 0))
        result.unsafe_enables += int(kv.get("unsafe_enables", 0))
        # The iteration vnetraw stopped at (the device stopped answering), else the batch.
        failed_it = kv.get("failed_iteration", "-")
        where = (int(failed_it), 1) if failed_it.isdigit() else (first, count)
        try:
            tb.check_alive()
            now = tb.device.stats()
        except ServerDied as exc:
            result.crashes += 1
            result.failure = str(exc)
            result.failed_range = where
            break
        except (OSError, ValueError, RuntimeError) as exc:
            result.crashes += 1
            result.failure = f"device server does not answer: {exc}"
            result.failed_range = where
            break
        refused, bad = split_violations(violation_delta(last, now))
        _add(result.refused, refused)
        _add(result.out_of_mapping, bad)
        last = now
        tracebacks = _traceback_count(tb.device.log, log_at)
        log_at = tb.device.log.stat().st_size
        result.server_tracebacks += tracebacks
        if rc != 0 or bad or tracebacks:
            why = [f"vnetraw exit {rc}: {err}"] if rc != 0 else []
            if bad:
                why.append(f"ledger: accesses outside a mapping {bad}")
            if tracebacks:
                why.append(f"{tracebacks} traceback(s) in {tb.device.log}")
            result.failure = "; ".join(why)
            result.failed_range = where
            break
        result.elapsed = time.monotonic() - started
        # Short enough for an 80-column line with the elapsed time appended.
        note(f"{result.done}/{cfg.iterations} it, {result.rate:.0f}/s, server alive, "
             f"out-of-mapping 0, refused {sum(result.refused.values())}")
    result.elapsed = time.monotonic() - started
    if result.failure is None:
        result.traffic = _traffic(tb, cfg.echoes)
    return result


#: Per run directory, the next datagram of the host peer's schedule: the peer checks them in
#: order, so each traffic check on one testbed continues where the last stopped.
_next_datagram: dict[str, int] = {}


def _traffic(tb: Any, count: int) -> str:
    """A reset device passes `count` verified UDP echoes (and answers ARP) again."""
    from harness.guest.agent import AgentError

    first = _next_datagram.get(str(tb.run_dir), 0)
    try:
        r = tb.guest.run(f"vnetraw udp-echo --count {count} --first {first} "
                         f"--seed {TRAFFIC_SEED} --timeout 90", timeout=150)
    except AgentError as exc:
        return f"FAILED: guest agent: {exc}"
    kv = parse_kv(r.text)
    if r.returncode != 0 or kv.get("echoes_ok") != str(count) or kv.get("echoes_bad") != "0":
        return f"FAILED: rc={r.returncode} {r.text.strip()} {r.stderr.decode().strip()}"
    _next_datagram[str(tb.run_dir)] = first + count
    if tb.device.stats().get("device", {}).get("needs_reset"):
        return "FAILED: the device needs a reset after the echoes"
    return f"ok ({count} UDP echoes verified byte for byte)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness fuzz", description="seeded in-guest fuzzing of the device through the "
        "raw driver (vnetraw fuzz); checks the server and the DMA ledger after each batch")
    p.add_argument("--iterations", type=argtypes.positive_int, required=True, metavar="N")
    p.add_argument("--seed", type=argtypes.nonnegative_int, default=1, metavar="S")
    p.add_argument("--first", type=argtypes.nonnegative_int, default=0, metavar="I",
                   help="the first iteration (reproduce one with --first I --iterations 1)")
    p.add_argument("--batch", type=argtypes.positive_int, default=1000, metavar="B",
                   help="iterations per guest command; the host checks after each (1000)")
    p.add_argument("--kernel", type=Path, metavar="PATH",
                   help="the guest kernel (as for vm-test; default the pinned Debian kernel)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    p.add_argument("--echoes", type=argtypes.positive_int, default=20, metavar="N",
                   help="verified UDP echoes after the last reset (20)")
    p.add_argument("--out", type=Path, help="parent directory for run logs (default build/fuzz)")
    return p


def main(argv: list[str]) -> int:
    from harness import paths, proc
    from harness.guest.kernel import KernelError
    from harness.progress import Progress
    from harness.testbed import TestbedError

    args = parser().parse_args(argv)
    if args.seed >= 1 << 64 or args.first + args.iterations >= 1 << 64:
        parser().error("--seed and --first + --iterations must fit in 64 bits")
    cfg = FuzzConfig(iterations=args.iterations, seed=args.seed, first=args.first,
                     batch=args.batch, kernel=args.kernel, accel=args.accel, out_dir=args.out,
                     echoes=args.echoes)
    try:
        with proc.interrupts(), Progress("fuzz") as prog:
            result = run_fuzz(cfg, prog.note)
    except (paths.EnvError, KernelError, TestbedError) as exc:
        print(f"harness fuzz: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return proc.report_interrupted("harness fuzz", exc)
    print(summary(result, args.kernel))
    return 0 if result.ok else 1
