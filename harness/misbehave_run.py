"""`harness misbehave`: run the misbehaviour catalogue against a guest kernel, classify how the
kernel reacted, compare with the recorded baseline for that kernel.

Each case is its own vm-test with a small plan. ``classify`` turns a run into one class, the
worst that applies:

    oops        kernel_oops/bug/panic/kasan/kfence/ubsan
    hang        kernel_soft_lockup/hard_lockup/hung_task/rcu_stall, or the guest's plan never
                completed (it stopped reporting, or the run timed out)
    corruption  the host peers (or the guest) saw wrong bytes: a byte mismatch or bad datagrams
    warning     kernel_warning
    graceful    none of these: the driver dropped, reset or reported and the plan ran to its
                end (guest tests may fail: losing frames is an allowed reaction)

A run in which the case never acted (the device's counters say so and the console shows
nothing) is ``inactive`` whatever happened: its plan said nothing about the case, and a
baseline must not take that for the kernel's reaction (the RX notification cases, waiting for a
quiet queue, never acted where the plan had none: that read as graceful).

Baselines live in ``qemu/baselines/misbehave-<kernel version>.json`` ({case: class}).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.report import Case, RunResult
from harness.virtio.misbehave import CASES
from harness.virtio.misbehave_catalogue import CASE_TIMEOUT

CLASSES = ("graceful", "warning", "corruption", "hang", "oops")
#: What run_case reports for a case that never acted (not a reaction: never a baseline's).
INACTIVE = "inactive"
_OOPS = {"kernel_oops", "kernel_bug", "kernel_panic", "kernel_kasan", "kernel_kfence",
         "kernel_ubsan"}
_HANG = {"kernel_soft_lockup", "kernel_hard_lockup", "kernel_hung_task", "kernel_rcu_stall"}
#: Wrong bytes seen by the host peers or by the guest's own checks (its receive side compares
#: every byte: "mismatch at offset", "bad echo").
_CORRUPT = re.compile(r"first mismatch at \d|mismatch at offset \d|bad echo|[1-9]\d* bad|corrupt",
                      re.I)
#: Console lines worth quoting as evidence of how the driver reacted.
_DRIVER_LINE = re.compile(r"virtio|eth0|NETDEV WATCHDOG|nobody cared|irq \d+:", re.I)
BASELINE_DIR = Path(__file__).resolve().parents[1] / "qemu" / "baselines"
#: The plan every case runs: small, but long enough for 200 completions and to show recovery.
SMALL_PLAN = {"tcp_bytes": 4 << 20, "udp_count": 100}
#: Per-case timeout for cases the baseline records as a hang. Measured in the fresh-clone gate
#: of 2026-12-01 (a slower machine than earlier gates, TCG): a case that ends gracefully takes
#: 12-18 s in all, boot and shutdown included, so 25 s leaves a margin for slower machines.
#: Since the PVH boot and the faster ping (same machine): 9-11 s, slow-completions 19 s. Kept
#: at 25 s: a hang case that turns graceful but slow must still be seen as graceful.
HANG_TIMEOUT = 25.0
#: The kernel a plain vm-test boots; its baseline guesses the hangs of a kernel without one.
PINNED = "7.3.4+deb13-amd64"


def _head(c: Case) -> str:
    return f"{c.name}: {c.detail}".splitlines()[0]


def classify(result: RunResult, console: str = "") -> tuple[str, list[str]]:
    """(class, evidence lines) for one run (see the module docstring)."""
    failed = result.failed
    names = {c.name for c in failed}
    evidence: list[str] = []
    oops = [c for c in failed if c.name in _OOPS]
    hang = [c for c in failed if c.name in _HANG]
    incomplete = [c for c in failed if c.name == "guest_plan_complete"]
    corrupt = [c for c in failed if _CORRUPT.search(c.detail or "")]
    if oops:
        cls, why = "oops", oops
    elif hang or incomplete or (result.error and "did not finish" in result.error):
        cls, why = "hang", hang + incomplete
        if result.error:
            evidence.append(f"run: {result.error}")
    elif corrupt:
        cls, why = "corruption", corrupt
    elif "kernel_warning" in names:
        cls, why = "warning", [c for c in failed if c.name == "kernel_warning"]
    else:
        cls, why = "graceful", [c for c in failed if not c.name.startswith("kernel_")]
    evidence += [_head(c) for c in why]
    if cls == "graceful" and result.error:
        evidence.append(f"run: {result.error}")
    quoted = 0
    for line in console.splitlines():
        if _DRIVER_LINE.search(line) and re.search(r"error|bad|broken|timed out|not a head|"
                                                   r"out of range|nobody|disabl|missing",
                                                   line, re.I):
            evidence.append("console: " + line.strip())
            quoted += 1
            if quoted >= 3:
                break
    bad = {k: v for k, v in result.guest_net.items()
           if k != "tcp_retrans_segs" and ("dropped" in k or "errors" in k) and v}
    if bad:
        evidence.append("guest: " + ", ".join(f"{k} {v}" for k, v in sorted(bad.items())))
    fired = result.device_stats.get("device", {}).get("misbehave", {}).get("fired", {})
    if isinstance(fired, dict) and fired:
        evidence.append("device: " + ", ".join(f"{k} acted {v}x" for k, v in fired.items()))
    return cls, evidence


@dataclass
class Outcome:
    case: str
    cls: str
    evidence: list[str]
    seconds: float
    run_dir: str
    kernel_version: str
    #: Seconds from the first firing until traffic resumed on both queues, else until the
    #: driver reset or failed the device; None (shown '-'): neither before the run ended.
    recover_s: float | None = None
    #: "traffic" or "reset" (the driver reset or failed the device: shown with an "r").
    recovered_by: str | None = None


def case_spec(case: str) -> str:
    """How the catalogue runs ``case``: after the case's ``after`` completions (200: the
    interface is up and traffic flowing; 0 for probe-time cases), once unless the case is one
    whose single firing shows nothing (interrupt storms, slow completions, ...)."""
    c = CASES[case]
    on = "" if c.queue == "any" else f":queue={c.queue}"
    return f"{case}:after={c.after}{on}" + (":always" if c.always or case == "interrupt-storm"
                                         else "")


def case_timeout(case: str, baseline: str | None, hang: float = HANG_TIMEOUT,
                 given: float | None = None) -> float:
    """How long a run of ``case`` may take: ``hang`` for a case its kernel's ``baseline``
    records as a hang, else ``given`` (--timeout), else the case's own (Case.timeout). A case
    with a longer timeout of its own keeps it even after a hang (needs-reset-no-interrupt:
    its graceful run ends 55-146 s in, so at the hang budget it could never be anything but
    a hang)."""
    own = CASES[case].timeout
    if baseline == "hang" and own <= CASE_TIMEOUT:
        return hang
    return given if given is not None else own


def recover_seconds(result: RunResult) -> float | None:
    """The device's time to recover (harness.virtio.misbehave), from the run's stats."""
    mb = result.device_stats.get("device", {}).get("misbehave", {})
    value = mb.get("recover_s") if isinstance(mb, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def recovered_by(result: RunResult) -> str | None:
    mb = result.device_stats.get("device", {}).get("misbehave", {})
    value = mb.get("recovered_by") if isinstance(mb, dict) else None
    return value if isinstance(value, str) else None


def device_stats(result: RunResult) -> dict[str, Any]:
    """The device's final counters: the result's, or for a run that timed out (none in its
    result) what the server wrote when it stopped (net0-stats.json in the run directory)."""
    if result.device_stats:
        return result.device_stats
    try:
        data = json.loads((Path(result.run_dir) / "net0-stats.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def acted(case: str, result: RunResult, evidence: list[str]) -> bool:
    """Whether ``case`` acted in this run: the device counted it firing, or the console
    shows the driver reacting (``evidence`` from classify)."""
    mb = device_stats(result).get("device", {}).get("misbehave", {})
    fired = mb.get("fired", {}) if isinstance(mb, dict) else {}
    return bool(isinstance(fired, dict) and fired.get(case)) or any(
        e.startswith("console: ") for e in evidence)


def run_case(case: str, kernel: Path | None, out: Path | None, timeout: float) -> Outcome:
    from harness.runner import VmTestConfig, run_vm_test

    spec = case_spec(case)
    cfg = VmTestConfig(kernel=kernel, out_dir=out, timeout=timeout, misbehave=(spec,),
                       tcp_bytes=SMALL_PLAN["tcp_bytes"], udp_count=SMALL_PLAN["udp_count"])
    started = time.monotonic()
    result = run_vm_test(cfg)
    console_path = Path(result.run_dir) / "console.log"
    try:
        console = console_path.read_text(errors="replace")
    except OSError:
        console = ""
    cls, evidence = classify(result, console)
    if not acted(case, result, evidence):
        cls = INACTIVE
        evidence.insert(0, "device: the case never acted (the plan gave it no chance)")
    # Traffic that resumed in a run that hung is not a recovery.
    recover = None if cls == "hang" else recover_seconds(result)
    return Outcome(case, cls, evidence, time.monotonic() - started, result.run_dir,
                   result.kernel_version, recover,
                   None if recover is None else recovered_by(result))


def baseline_path(kernel_version: str) -> Path:
    return BASELINE_DIR / f"misbehave-{kernel_version}.json"


def baseline_before(kernel: Path | None) -> dict[str, str]:
    """The baseline that decides the first case's timeout: the pinned kernel's without
    ``kernel``, else that kernel's (or, without one, the pinned one's guess). A run of one known
    hang must get the hang budget too: at 60 s a guest whose queue broke can finish its plan's
    failing steps just inside the timeout and read back graceful (used-idx-backwards, 57 s).
    KernelError for a ``kernel`` that is none (before anything boots)."""
    if kernel is None:
        return baseline_guess(PINNED)
    from harness.guest.kernel import locate

    return baseline_guess(locate(kernel).version)  # the run's own first step (cached after)


def baseline_guess(kernel_version: str) -> dict[str, str]:
    """The baseline that decides timeouts on ``kernel_version``: its own, or for a kernel
    without one yet the pinned kernel's guess (empty if neither is recorded)."""
    return load_baseline(kernel_version) or load_baseline(PINNED) or {}


def load_baseline(kernel_version: str) -> dict[str, str] | None:
    try:
        data = json.loads(baseline_path(kernel_version).read_text())
    except (OSError, ValueError):
        return None
    cases = data.get("cases") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in cases.items()} if isinstance(cases, dict) else None


def compare(observed: dict[str, str], baseline: dict[str, str]) -> list[str]:
    """What changed against the baseline, one line each (empty: nothing)."""
    out = []
    for case, cls in observed.items():
        was = baseline.get(case)
        if was is None:
            out.append(f"{case}: {cls} (no baseline)")
        elif was != cls:
            out.append(f"{case}: was {was}, now {cls}")
    return out


def table(outcomes: list[Outcome]) -> str:
    """case, class, first evidence line, time to recover, run seconds; 88 columns."""
    lines = [f"{'case':<28} {'class':<10} {'evidence':<33} {'recover':>7} {'run':>5}"]
    for o in outcomes:
        ev = next((e for e in o.evidence if e.startswith("console: ")),
                  o.evidence[0] if o.evidence else "-")
        ev = ev.removeprefix("console: ")
        ev = re.sub(r"^\[\s*[\d.]+\]\s*(virtio_net virtio\d+ ?(eth\d+:)?:?\s*)?", "", ev)
        if len(ev) > 33:
            ev = ev[:32] + "~"
        rec = "-" if o.recover_s is None else f"{o.recover_s:.2f}"
        rec += "r" if o.recovered_by == "reset" else ""
        lines.append(f"{o.case:<28} {o.cls:<10} {ev:<33} {rec:>7} {o.seconds:>5.0f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="harness misbehave",
                                description="run the misbehaving-device catalogue")
    p.add_argument("cases", nargs="*", help="cases to run (default with --all: every case)")
    p.add_argument("--all", action="store_true", help="run every case")
    p.add_argument("--list", action="store_true", help="list the cases with clause and bug class")
    p.add_argument("--kernel", type=Path, metavar="PATH", help="the guest kernel under test")
    p.add_argument("--out", type=Path, help="parent directory for run logs")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="per case (a case that runs out is a hang; default the case's own: "
                        "60 s, 180 s for needs-reset-no-interrupt)")
    p.add_argument("--hang-timeout", type=float, default=HANG_TIMEOUT, metavar="SECONDS",
                   help="per case the kernel's baseline says hangs (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    p.add_argument("--write-baseline", action="store_true",
                   help="record the classes observed as the baseline for this kernel")
    a = p.parse_args(argv)
    if a.list:
        for c in CASES.values():
            print(f"{c.name}\n  clause: {c.clause}\n  bug class: {c.bug_class}\n  does: {c.what}")
        return 0
    unknown = [c for c in a.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s): {', '.join(unknown)} (see --list)")
    cases = list(CASES) if a.all else a.cases
    if not cases:
        p.error("name cases or give --all")
    if (a.timeout is not None and a.timeout <= 0) or a.hang_timeout <= 0:
        p.error("timeouts must be positive")
    from harness.guest.kernel import KernelError

    try:
        known = baseline_before(a.kernel)
    except KernelError as exc:
        p.error(str(exc))  # a bad --kernel: one line, as vm-test says it
    outcomes: list[Outcome] = []
    for case in cases:
        # A known hang costs its whole timeout: once the kernel (and so its baseline) is known,
        # such cases get the short one.
        timeout = case_timeout(case, known.get(case), a.hang_timeout, a.timeout)
        print(f"misbehave {case} (timeout {timeout:.0f} s) ...", file=sys.stderr, flush=True)
        outcomes.append(run_case(case, a.kernel, a.out, timeout))
        if len(outcomes) == 1:  # the kernel that really booted decides from here on
            known = baseline_guess(outcomes[0].kernel_version)
    observed = {o.case: o.cls for o in outcomes}
    version = outcomes[0].kernel_version
    if a.json:
        print(json.dumps({"kernel": version, "outcomes": [o.__dict__ for o in outcomes]},
                         indent=2))
    else:
        print(f"kernel {version}")
        print(table(outcomes))
        for o in outcomes:
            if o.cls != "graceful" or o.evidence:
                print(f"\n{o.case} ({o.cls}):")
                for line in o.evidence:
                    print(f"  {line}")
    if a.write_baseline:
        path = baseline_path(version)
        old = load_baseline(version) or {}
        path.parent.mkdir(parents=True, exist_ok=True)
        # A case that never acted says nothing about the kernel: its old class stays.
        kept = {k: v for k, v in observed.items() if v != INACTIVE}
        for case in sorted(observed.keys() - kept.keys()):
            print(f"not recorded: {case} never acted", file=sys.stderr)
        data: dict[str, Any] = {"kernel": version, "cases": {**old, **kept}}
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"baseline written: {path}")
        return 0
    baseline = load_baseline(version)
    if baseline is None:
        print(f"no baseline for kernel {version} ({baseline_path(version)})", file=sys.stderr)
        return 1
    changed = compare(observed, baseline)
    for line in changed:
        print(f"CHANGED {line}")
    return 1 if changed else 0
