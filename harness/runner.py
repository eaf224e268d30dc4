"""`harness vm-test`: boot a guest against our device, run the guest's test plan, judge it.

The orchestration, in order: pick the accelerator (probing KVM), build the initramfs, create a
private network namespace, start the device server and the host-side test peers inside it,
boot QEMU, follow the guest's KTAP on the console, collect the device's counters and the
peers' verdicts, and turn all of it into Cases. Everything started is stopped in `finally`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import paths
from harness.checks import host_checks
from harness.progress import Progress
from harness.report import Case, RunResult
from harness.testbed import PeerSpec, Testbed, TestbedConfig
from harness.vm import ktap
from harness.vm.machine import Machine, MachineError
from harness.vm.stall import BootStalled
from harness.vm.verdicts import kernel_cases

log = logging.getLogger(__name__)

MIB = 1 << 20
#: Seconds from QEMU's start to /init's KTAP header before a boot counts as stalled. A boot
#: takes 6-9 s under TCG here (15 s on a loaded CI machine); a slow debug kernel may need
#: ``--boot-timeout``. Without it a stalled boot sat out the whole plan timeout (900 s).
BOOT_TIMEOUT = 120.0


@dataclass(frozen=True)
class VmTestConfig:
    """What one run does; every field is a CLI option of `harness vm-test`."""

    accel: str = "auto"
    map_ops: str = "direct"
    viommu: bool = False
    #: Fault-injection spec for the device's map ops, e.g. "mapping-error=0.01,seed=7".
    faults: str | None = None
    #: All checksum/TSO offloads on (True) or off (False); None: as ``features`` says.
    offloads: bool | None = None
    #: Device feature switches (harness.virtio.features), e.g. "mrg_rxbuf=off,mtu=9000".
    features: str = ""
    smp: int = 2
    memory_mb: int = 512
    tcp_bytes: int = 64 * MIB
    udp_count: int = 1000
    seed: int = 1
    timeout: float = 900.0
    #: Seconds to /init's KTAP header (BOOT_TIMEOUT; capped by ``timeout``).
    boot_timeout: float = BOOT_TIMEOUT
    out_dir: Path | None = None
    #: Write every frame the device moves to this pcapng file.
    pcap: Path | None = None
    #: The kernel under test (see harness.guest.kernel); None: the pinned one.
    kernel: Path | None = None
    append: tuple[str, ...] = ()
    initrd_add: Path | None = None
    #: Kernel WARNINGs on the console pass (with their excerpt) instead of failing the run.
    allow_warnings: bool = False
    #: Misbehaviour specs for the device (harness.virtio.misbehave), e.g. "used-len-zero".
    misbehave: tuple[str, ...] = ()
    #: QEMU trace events (names or globs) logged with timestamps to the run's qemu.log.
    qemu_trace: tuple[str, ...] = ()
    #: How the kernel boots: auto, pvh or bzimage (harness.guest.pvh).
    boot: str = "auto"

    def testbed(self) -> TestbedConfig:
        return TestbedConfig(
            accel=self.accel, map_ops=self.map_ops, viommu=self.viommu, faults=self.faults,
            offloads=self.offloads, features=self.features, smp=self.smp, memory_mb=self.memory_mb,
            cmdline=guest_cmdline(self), pcap=self.pcap, kernel=self.kernel,
            append=self.append, initrd_add=self.initrd_add, misbehave=self.misbehave,
            qemu_trace=self.qemu_trace, boot=self.boot,
            peers=PeerSpec(tcp_bytes=self.tcp_bytes, udp_count=self.udp_count, seed=self.seed))


def new_run_dir(base: Path | None) -> Path:
    return paths.new_run_dir(base or paths.build_dir() / "vm-test")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def guest_cmdline(cfg: VmTestConfig) -> tuple[str, ...]:
    """The test plan's parameters, read by the guest's /init from /proc/cmdline."""
    return (f"harness.bytes={cfg.tcp_bytes}", f"harness.udp={cfg.udp_count}",
            f"harness.seed={cfg.seed}")


_RESULT = re.compile(r"^(ok|not ok) (\d+) (\S+)(.*)$", re.M)
_PLAN = re.compile(r"^1\.\.(\d+)$", re.M)


def follow_console(console: Path, machine: Machine, timeout: float,
                   progress: Progress | None = None,
                   alive: Callable[[], None] = lambda: None,
                   boot_timeout: float | None = None) -> tuple[str, float | None]:
    """Wait for the end of the guest's plan; return the console text and the boot time.
    Each KTAP result is a progress step as it appears; `alive` raises if a part of the run
    died (it is called every 0.2 s). No KTAP header within ``boot_timeout`` seconds of QEMU's
    start raises BootStalled."""
    deadline = time.monotonic() + timeout
    boot: float | None = None
    text = ""
    seen = 0
    while True:
        try:
            text = console.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if boot is None and ktap.HEADER in text:
            boot = time.monotonic() - machine.launched_at
            if progress is not None:
                progress.note(f"guest booted in {boot:.1f} s")
        if progress is not None:
            plan = _PLAN.search(text)
            if plan and progress.total is None:
                progress.set_total(int(plan.group(1)))
            results = _RESULT.findall(text)
            for status, _n, name, rest in results[seen:]:
                progress.step(f"{status} {name}{' # SKIP' if '# SKIP' in rest else ''}")
            seen = len(results)
        if ktap.DONE in text:
            return text, boot
        if not machine.running():
            alive()  # QEMU may have gone down because a device server died: say that first
            text = console.read_text(errors="replace") if console.exists() else text
            return text, boot
        alive()
        now = time.monotonic()
        if boot is None and boot_timeout is not None and now - machine.launched_at > boot_timeout:
            last = text.strip().splitlines()[-1][:120] if text.strip() else ""
            # Printable only: a shell's or firmware's escape sequences would garble the report.
            console_says = ("its console ends: " + "".join(c if c.isprintable() else "?"
                                                           for c in last)
                            if last else "its console is empty")
            raise BootStalled(f"the guest's boot stalled: no KTAP header from /init within "
                              f"{boot_timeout:.0f} s of QEMU's start ({console_says})")
        if now > deadline:
            raise TimeoutError(f"the guest did not finish its plan within {timeout:.0f} s")
        time.sleep(0.2)


def run_vm_test(cfg: VmTestConfig) -> RunResult:
    """Run the whole thing once; never raises for a failing guest, only reports it. A kernel
    or testbed that cannot run the plan (KernelError, TestbedError) raises before anything
    starts, before even the accelerator probe."""
    started = time.monotonic()
    env = paths.load_env()
    run_dir = new_run_dir(cfg.out_dir)
    tb = Testbed(cfg.testbed(), run_dir, env=env)
    accel = tb.accel
    result = RunResult(accel=accel.name, accel_reason=accel.reason, map_ops=cfg.map_ops,
                       viommu=cfg.viommu, faults=cfg.faults or "", qemu_version=env.qemu_version,
                       kernel_version=tb.kernel.version, run_dir=str(run_dir),
                       deps=dict(env.provenance), drift=list(env.drift))
    if cfg.kernel is not None:
        result.deps["kernel"] = (f"{tb.kernel.version} from {tb.kernel.source} (under test; "
                                 "the pinned kernel is not used)")
    result.drift += [f"kernel: {n}" for n in tb.kernel.notes]
    result.deps["boot"] = f"{tb.boot.mode}: {tb.boot.reason}"
    log.info("accelerator: %s (%s)", accel.name, accel.reason)
    try:
        _run(cfg, tb, result)
    except (MachineError, RuntimeError, TimeoutError, OSError) as exc:
        log.error("vm-test failed: %s", exc)
        result.error = str(exc).splitlines()[0]
        (run_dir / "error.txt").write_text(str(exc) + "\n")
    result.wall_seconds = time.monotonic() - started
    (run_dir / "result.json").write_text(result.to_json())
    return result


def _run(cfg: VmTestConfig, tb: Testbed, result: RunResult) -> None:
    with Progress("vm-test") as progress, tb:
        progress.note(f"QEMU started (accel {tb.accel.name})")
        try:
            text, result.boot_seconds = follow_console(
                tb.console_log, tb.machine, cfg.timeout, progress, alive=tb.check_alive,
                boot_timeout=cfg.boot_timeout)
        except BootStalled as exc:
            raise BootStalled(f"{exc}; {tb.diagnose_stall()}") from None
        # The guest powers itself off after the plan; give it a moment, then QMP quit.
        tb.machine.wait(30)
        tb.machine.shutdown()
        # QEMU is gone: the server sees the disconnect, writes its counters and exits.
        if not tb.device.wait(30):
            log.warning("device server still running 30 s after QEMU exited")
    report = ktap.parse(text)
    stats = tb.device.final_stats()
    peer = _read_json(tb.peer_results)
    result.device_stats = stats
    result.guest_net = dict(report.metrics.get("guest_net", {}))
    result.cases = judge(report, peer, stats, cfg)
    result.cases += kernel_cases(text, allow_warnings=cfg.allow_warnings)


def judge(report: ktap.KtapReport, peer: dict[str, Any], stats: dict[str, Any],
          cfg: VmTestConfig) -> list[Case]:
    """Combine the guest's own verdicts with the host side's checks into one list of Cases."""
    cases: list[Case] = []
    for test in report.tests:
        ok: bool | None = test.status is not ktap.Status.FAIL
        if test.status is ktap.Status.SKIP:
            ok = None
        cases.append(Case(test.name, ok, test.reason, dict(test.metrics)))
    if report.plan is not None and len(report.tests) < report.plan:
        cases.append(Case("guest_plan_complete", False,
                          f"guest planned {report.plan} tests, reported {len(report.tests)}"))
    elif not report.done:
        cases.append(Case("guest_plan_complete", False, "the guest never printed its done line"))
    cases += host_checks(cases, peer, stats, cfg.tcp_bytes, cfg.udp_count, viommu=cfg.viommu)
    return cases
