"""follow_console and Testbed.check_alive: a device server that dies is reported as such, even
when QEMU goes down within the same poll (QEMU 11.1 sometimes aborts on the lost socket); one
that ends cleanly because QEMU left is not."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from harness.guest.agent import AgentNotReady
from harness.runner import follow_console
from harness.testbed import ServerDied, Testbed
from harness.vm import ktap
from harness.vm.machine import Machine
from harness.vm.stall import BootStalled


class FakeMachine:
    def __init__(self, running: bool) -> None:
        self.up = running
        self.launched_at = 0.0

    def running(self) -> bool:
        return self.up


def _dead() -> None:
    raise ServerDied("device server net0 died")


def test_qemu_gone_after_a_server_death_is_reported_as_the_server_death(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("ok 1 link_up\n")
    with pytest.raises(ServerDied):
        follow_console(console, cast(Machine, FakeMachine(running=False)), 5, alive=_dead)


def test_qemu_gone_with_servers_alive_returns_the_console(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("ok 1 link_up\n")
    text, _ = follow_console(console, cast(Machine, FakeMachine(running=False)), 5)
    assert text == "ok 1 link_up\n"


def test_a_finished_plan_is_not_blamed_on_a_server(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text(f"ok 1 link_up\n{ktap.DONE}\n")
    text, _ = follow_console(console, cast(Machine, FakeMachine(running=True)), 5, alive=_dead)
    assert ktap.DONE in text


def _testbed(tmp_path: Path, machine: FakeMachine, proc: Any) -> Testbed:
    tb = Testbed.__new__(Testbed)
    log = tmp_path / "net0-server.log"
    log.write_text("last words\n")
    dev = SimpleNamespace(spec=SimpleNamespace(name="net0"), proc=proc, log=log)
    tb._machine = cast(Machine, machine)
    tb.devices = [dev]  # type: ignore[list-item]
    return tb


@pytest.mark.parametrize("qemu_running", [True, False])
def test_check_alive_reports_a_dead_server_whether_or_not_qemu_runs(
        tmp_path: Path, qemu_running: bool) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    tb = _testbed(tmp_path, FakeMachine(qemu_running), proc)
    with pytest.raises(ServerDied) as exc:
        tb.check_alive()
    assert "exit status 3" in str(exc.value) and "last words" in str(exc.value)
    assert ("QEMU has exited too" in str(exc.value)) is not qemu_running


def test_a_server_ending_cleanly_after_qemu_is_no_death(tmp_path: Path) -> None:
    # Its only client left (the guest powered off or panicked): the server exits with 0.
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(0)"])
    proc.wait()
    _testbed(tmp_path, FakeMachine(False), proc).check_alive()
    with pytest.raises(ServerDied):  # while QEMU runs, any exit is a death
        _testbed(tmp_path, FakeMachine(True), proc).check_alive()


def test_check_alive_is_quiet_while_the_server_runs(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _testbed(tmp_path, FakeMachine(False), proc).check_alive()
    finally:
        proc.kill()
        proc.wait()


def test_no_ktap_header_within_the_boot_timeout_is_a_stalled_boot(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("")
    machine = FakeMachine(running=True)
    machine.launched_at = time.monotonic() - 10
    started = time.monotonic()
    with pytest.raises(BootStalled, match="console is empty"):
        follow_console(console, cast(Machine, machine), 60, boot_timeout=5)
    assert time.monotonic() - started < 2  # at once: not the plan's timeout
    console.write_text("[    3.1] some early warning\n")
    with pytest.raises(BootStalled, match=r"console ends: .*some early warning"):
        follow_console(console, cast(Machine, machine), 60, boot_timeout=5)


def test_a_booted_guest_is_not_stalled_however_long_its_plan(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text(f"{ktap.HEADER}\nok 1 link_up\n")
    machine = FakeMachine(running=True)
    machine.launched_at = time.monotonic() - 10
    with pytest.raises(TimeoutError) as exc:
        follow_console(console, cast(Machine, machine), 0.5, boot_timeout=5)
    assert not isinstance(exc.value, BootStalled)


class _SilentAgent:
    def wait_ready(self, timeout: float) -> None:
        raise AgentNotReady("no guest agent answered within 1 s")


@pytest.mark.parametrize("booted", [False, True])
def test_wait_shell_names_a_stalled_boot(tmp_path: Path, booted: bool) -> None:
    """Testbed users (bench, raw-driver tests) wait for the agent, not for KTAP: a boot that
    stalled must still be reported as one, with the vCPU diagnosis, and only then."""
    tb = _testbed(tmp_path, FakeMachine(True), None)
    tb.console_log = tmp_path / "console.log"
    tb.console_log.write_text(f"{ktap.HEADER}\n" if booted else "")
    tb._guest = cast(Any, _SilentAgent())
    tb.diagnose_stall = lambda: "CPU0 kernel text RIP=0xffffffff81494928 (running, moving)"  # type: ignore[method-assign]
    with pytest.raises(TimeoutError) as exc:
        tb.wait_shell(1)
    assert isinstance(exc.value, BootStalled) is not booted
    assert ("RIP=0xffffffff81494928" in str(exc.value)) is not booted
    assert "no guest agent answered" in str(exc.value)
