"""Accelerator choice: auto must probe, never trust /dev/kvm's existence."""

from __future__ import annotations

import pytest

from harness.vm.accel import ProbeResult, choose_accel


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
