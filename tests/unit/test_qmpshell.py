"""The QMP shell's guard: device_del of a vfio-user device is refused (it aborts QEMU 11.1.3)."""

from __future__ import annotations

from harness.qmpshell import HarnessShell, refusal


def test_device_del_of_vfio_user_device_is_refused() -> None:
    why = refusal({"execute": "device_del", "arguments": {"id": "net1"}}, {"net0", "net1"})
    assert why is not None and "aborts QEMU" in why and "net1" in why


def test_other_commands_and_other_devices_pass() -> None:
    assert refusal({"execute": "query-pci"}, {"net0"}) is None
    assert refusal({"execute": "device_del", "arguments": {"id": "disk0"}}, {"net0"}) is None


def test_shell_parses_before_guarding_and_force_overrides() -> None:
    shell = HarnessShell("/nonexistent.sock", vfio_user_ids={"net0"})
    assert shell.guard("device_del id=net0") is not None
    assert shell.guard("query-status") is None
    assert shell.guard("") is None
    forced = HarnessShell("/nonexistent.sock", vfio_user_ids={"net0"}, force=True)
    assert forced.guard("device_del id=net0") is None
