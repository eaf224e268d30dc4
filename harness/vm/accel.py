"""Choosing the accelerator: KVM when it can really run this guest, TCG otherwise, with a reason.

The existence of /dev/kvm proves nothing: on these machines it is PVM, a paravirtual KVM that
only runs PVM-enlightened kernels and kills a stock guest with an emulation failure within
seconds. So `auto` boots the real guest kernel under KVM for a few seconds and accepts KVM
only if the kernel gets all the way to mounting its root file system.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.proc import run_until

log = logging.getLogger(__name__)

#: Printed by the kernel once it has initialised everything and looks for a root file system;
#: with no initrd and no root= it then panics. Reaching it means KVM ran the whole boot.
PROBE_MARKER = "VFS: Unable to mount root fs"
PROBE_TIMEOUT = 30.0
#: What QEMU prints when KVM cannot run the guest (PVM: "KVM internal error. Suberror: 1",
#: then "emulation failure"); QEMU then stays paused, so the probe stops reading here.
KVM_ERROR = "KVM internal error"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use and why (shown in the summary and the results)."""

    name: str
    reason: str


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


def probe_args(qemu: list[str], kernel: Path) -> list[str]:
    """A minimal KVM boot of the guest kernel: no devices, no initrd, console on stdout."""
    return [*qemu, "-nodefaults", "-machine", "q35", "-accel", "kvm", "-cpu", "host",
            "-m", "256M", "-display", "none", "-no-reboot", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1", "-serial", "stdio"]


def run_probe(qemu: list[str], kernel: Path, timeout: float = PROBE_TIMEOUT) -> ProbeResult:
    """Boot the kernel under KVM until PROBE_MARKER (KVM works) or KVM_ERROR (it does not)."""
    argv = probe_args(qemu, kernel)
    log.debug("KVM probe: %s", " ".join(argv))
    out, how = run_until(argv, lambda text: PROBE_MARKER in text or KVM_ERROR in text, timeout,
                         name="KVM probe QEMU")
    if PROBE_MARKER in out:
        return ProbeResult(True, "guest kernel booted under KVM")
    if how == "timeout":
        return ProbeResult(False, f"guest kernel did not reach its root mount in {timeout:.0f} s")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "KVM" in ln or "error" in ln.lower()]
    detail = (errors or lines or ["QEMU exited"])[0].strip()
    return ProbeResult(False, f"guest kernel died under KVM: {detail}")


def probe_key(qemu: list[str], kernel: Path, boot_id: Path = BOOT_ID) -> str:
    """What the probe's verdict depends on: this boot of the host (its KVM), QEMU, the kernel."""
    st = kernel.stat()
    h = hashlib.sha256()
    for part in (boot_id.read_text().strip(), *qemu, str(kernel), str(st.st_size),
                 str(st.st_mtime_ns)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def cached_probe(qemu: list[str], kernel: Path, cache: Path,
                 probe: Callable[[], ProbeResult] | None = None) -> ProbeResult:
    """run_probe, remembered until the host reboots or QEMU or the kernel change.

    A probe that fails under PVM can take its whole timeout; every vm-test would pay it.
    """
    key = probe_key(qemu, kernel)
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return ProbeResult(bool(saved["ok"]), f"{saved['detail']} (cached probe)")
    except (OSError, ValueError, KeyError):
        pass
    result = (probe or (lambda: run_probe(qemu, kernel)))()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "ok": result.ok, "detail": result.detail}))
        tmp.replace(cache)  # parallel runs (pytest -n) never read half a file
    except OSError as exc:
        log.debug("could not cache the KVM probe: %s", exc)
    return result


def kvm_usable_device(dev: Path = Path("/dev/kvm")) -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    if not dev.exists():
        return f"{dev} does not exist"
    if not os.access(dev, os.R_OK | os.W_OK):
        return f"{dev} is not readable and writable by this user"
    return None


def is_pvm(sys_module: Path = Path("/sys/module")) -> bool:
    """True when the host's KVM is PVM (only runs PVM-enlightened guests)."""
    return (sys_module / "kvm_pvm").exists()


def choose_accel(requested: str, probe: Callable[[], ProbeResult],
                 device_problem: Callable[[], str | None] = kvm_usable_device,
                 pvm: Callable[[], bool] = is_pvm) -> AccelChoice:
    """Resolve `auto|kvm|tcg` to a concrete accelerator and the reason for it.

    `kvm` is taken at its word (a broken KVM then fails loudly); `auto` probes.
    """
    if requested == "tcg":
        return AccelChoice("tcg", "requested")
    if requested == "kvm":
        problem = device_problem()
        if problem:
            raise ValueError(f"--accel kvm: {problem}; use --accel tcg or auto")
        return AccelChoice("kvm", "requested")
    if requested != "auto":
        raise ValueError(f"unknown accelerator {requested!r}: use auto, kvm or tcg")
    problem = device_problem()
    if problem:
        return AccelChoice("tcg", f"KVM unavailable: {problem}")
    result = probe()
    if result.ok:
        return AccelChoice("kvm", f"KVM probe passed: {result.detail}")
    why = f"KVM probe failed: {result.detail}"
    if pvm():
        why += " (host KVM is PVM: kvm_pvm is loaded, it runs only PVM-enlightened guests)"
    return AccelChoice("tcg", why)
