"""Accelerator choice: auto must probe, never trust /dev/kvm's existence."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.proc import run_until
from harness.vm.accel import ProbeResult, cached_probe, choose_accel, run_probe


def test_tcg_requested() -> None:
    assert choose_accel("tcg", lambda: ProbeResult(True, "")).name == "tcg"


def test_auto_falls_back_when_probe_fails_and_names_pvm() -> None:
    choice = choose_accel(
        "auto",
        lambda: ProbeResult(False, "emulation failure"),
        device_problem=lambda: None,
        pvm=lambda: True,
    )
    assert choice.name == "tcg"
    assert "emulation failure" in choice.reason and "PVM" in choice.reason


def test_auto_uses_kvm_when_probe_passes() -> None:
    choice = choose_accel(
        "auto", lambda: ProbeResult(True, "booted"), device_problem=lambda: None, pvm=lambda: False
    )
    assert choice.name == "kvm"


def test_auto_without_dev_kvm_does_not_probe() -> None:
    def probe() -> ProbeResult:
        raise AssertionError("must not probe")

    choice = choose_accel("auto", probe, device_problem=lambda: "/dev/kvm does not exist")
    assert choice.name == "tcg" and "/dev/kvm" in choice.reason


def test_kvm_requested_but_missing_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--accel kvm"):
        choose_accel("kvm", lambda: ProbeResult(True, ""), device_problem=lambda: "missing")


def test_probe_verdict_is_cached_per_boot(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cache = tmp_path / "probe.json"
    calls: list[int] = []

    def probe() -> ProbeResult:
        calls.append(1)
        return ProbeResult(False, "emulation failure")

    first = cached_probe(["qemu"], kernel, cache, probe)
    second = cached_probe(["qemu"], kernel, cache, probe)
    assert calls == [1]
    assert not first.ok and not second.ok and "cached" in second.detail
    kernel.write_bytes(b"another kernel")  # a different guest kernel: probe again
    cached_probe(["qemu"], kernel, cache, probe)
    assert calls == [1, 1]


def fake_qemu(script: str) -> list[str]:
    """A 'QEMU' that runs `script` (the probe's own arguments become $1...)."""
    return ["sh", "-c", script, "qemu"]


def test_probe_stops_at_a_kvm_internal_error_although_qemu_stays_paused(tmp_path: Path) -> None:
    # What PVM does to a stock kernel: the error at once, then QEMU waits, paused.
    start = time.monotonic()
    r = run_probe(fake_qemu('echo "KVM internal error. Suberror: 1" >&2; echo "emulation '
                            'failure"; sleep 60'), tmp_path / "vmlinuz", timeout=20)
    assert time.monotonic() - start < 5
    assert r == ProbeResult(False, "guest kernel died under KVM: KVM internal error. Suberror: 1")


def test_probe_passes_at_the_root_mount_marker_and_stops_there(tmp_path: Path) -> None:
    start = time.monotonic()
    r = run_probe(fake_qemu('printf "Linux version\\nKernel panic - not syncing: VFS: Unable '
                            'to mount root fs on unknown-block(0,0)\\n"; sleep 60'),
                  tmp_path / "vmlinuz", timeout=20)
    assert time.monotonic() - start < 5
    assert r.ok


def test_probe_times_out_on_silence_and_reports_qemus_own_exit(tmp_path: Path) -> None:
    assert run_probe(fake_qemu("sleep 60"), tmp_path / "k", timeout=0.5) == ProbeResult(
        False, "guest kernel did not reach its root mount in 0 s")
    r = run_probe(fake_qemu('echo "qemu: could not open /dev/kvm" >&2; exit 1'),
                  tmp_path / "k", timeout=20)
    assert r == ProbeResult(False, "guest kernel died under KVM: qemu: could not open /dev/kvm")
    assert run_until(["true"], lambda _: False, 5, name="true") == ("", "exit")
