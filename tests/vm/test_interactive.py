"""Interactive debugging, driven as a person would: `harness run` on a terminal (a pty), the
QMP shell, a system_reset mid-traffic and a hot-added second device, all with a real guest.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.session import find_run
from harness.testbed import SHELL_CMDLINE, PeerSpec, Testbed, TestbedConfig
from harness.testing.console import GuestConsole
from harness.vm import ktap

from .conftest import need_root

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]
SHELL_READY = "# harness: shell on the console"



class Terminal:
    """A command on a pseudo-terminal, read and typed into like a person would."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec the command on the pty
            os.chdir(REPO)
            os.execv(argv[0], argv)
        self.text = ""
        self.pos = 0  # where the last match ended: each expect only sees newer output
        self.exited: int | None = None

    def kill(self) -> None:
        if self.exited is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {pattern!r} on the terminal; last: {self.text[-800:]!r}")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the command exited and closed the pty
                    data = b""
                if not data:
                    raise EOFError(f"terminal closed; last: {self.text[-800:]!r}")
                self.text += data.decode(errors="replace").replace("\r", "")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with_pid, status = os.waitpid(self.pid, os.WNOHANG)
            if with_pid:
                self.exited = os.waitstatus_to_exitcode(status)
                return self.exited
            try:  # keep draining, or the command may block writing to the pty
                r, _, _ = select.select([self.fd], [], [], 0.2)
                if r:
                    self.text += os.read(self.fd, 65536).decode(errors="replace")
            except OSError:
                time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        raise TimeoutError("the command did not exit")


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60)


def test_run_on_a_terminal_with_qmp_and_reset() -> None:
    need_root()
    term = Terminal([sys.executable, "-m", "harness", "run"])
    try:
        term.expect(r"QMP +harness qmp", 120)
        term.expect(re.escape(SHELL_READY), 120)
        term.expect(r"/ # ", 30)
        term.type("ping -c 3 -i 0.2 198.18.0.1\n")
        term.expect(r"3 packets transmitted, 3 packets received", 60)

        run = find_run()
        pci = harness("qmp", "query-pci")
        assert pci.returncode == 0, pci.stderr
        assert '"device": 4161' in pci.stdout and '"qdev_id": "net0"' in pci.stdout
        refused = harness("qmp", "device_del", "id=net0")
        assert refused.returncode == 2 and "aborts QEMU" in refused.stderr

        assert harness("qmp", "system_reset").returncode == 0
        term.expect(re.escape(SHELL_READY), 120)  # the guest booted again and probed the device
        term.expect(r"/ # ", 30)
        term.type("ping -c 3 -i 0.2 198.18.0.1\n")
        term.expect(r"3 packets transmitted, 3 packets received", 60)
        assert Path(run.run_dir, "run.json").exists()

        added = harness("hotplug")
        assert added.returncode == 0, added.stderr
        assert "added net1" in added.stdout
        term.type("for i in $(seq 50); do [ -e /sys/class/net/eth1 ] && break; usleep 200000; "
                  "done; ip link set eth1 up; ip addr add 198.18.1.2/24 dev eth1; "
                  "ping -c 3 -i 0.2 198.18.1.1\n")
        term.expect(r"3 packets transmitted, 3 packets received", 60)
        assert find_run().devices == ["net0", "net1"]
        full = harness("hotplug")  # one hot-plug port by default, now taken
        assert full.returncode == 1 and "hot-plug ports are taken" in full.stderr

        term.type("\x03")  # Ctrl-C on the harness's terminal: a signal here, not to the guest
        term.expect(r"harness run: interrupted \(SIGINT\), cleaned up: .*QEMU", 60)
        assert term.wait(30) == 130
    finally:
        term.kill()
    assert not Path(run.run_dir, "run.json").exists()


def test_exit_in_the_guest_ends_the_run() -> None:
    need_root()
    term = Terminal([sys.executable, "-m", "harness", "run"])
    try:
        term.expect(re.escape(SHELL_READY), 120)
        term.expect(r"/ # ", 30)
        term.type("exit\n")
        term.expect(r"the guest powered off; everything stopped", 60)
        assert term.wait(30) == 0
    finally:
        term.kill()


def test_hotplug_while_an_exec_command_runs() -> None:
    """`harness run --exec` serves `harness hotplug` while its command runs: the command waits
    for eth1, then pings through the device added under it."""
    need_root()
    cmd = ("for i in $(seq 150); do [ -e /sys/class/net/eth1 ] && break; usleep 200000; done; "
           "ip link set eth1 up && ip addr add 198.18.1.2/24 dev eth1 && "
           "ping -c 3 -i 0.2 198.18.1.1")
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "--exec", cmd], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        run = None
        while run is None or not Path(run.console_log).is_file() or (
                ktap.DONE not in Path(run.console_log).read_text(errors="replace")):
            assert time.monotonic() < end and proc.poll() is None, "the run never got going"
            time.sleep(0.5)
            try:
                run = find_run()
                if run.pid != proc.pid:
                    run = None
            except LookupError:
                run = None
        added = harness("hotplug")  # the plan is done: the command is running now
        assert added.returncode == 0, added.stderr
        assert "added net1" in added.stdout
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert "3 packets transmitted, 3 packets received" in out


@pytest.fixture
def testbed(tmp_path: Path) -> Iterator[Testbed]:
    need_root()
    cfg = TestbedConfig(console="socket", reboot=True, hotplug_ports=1,
                        cmdline=SHELL_CMDLINE,
                        peers=PeerSpec(tcp_bytes=1 << 40, timeout=600))
    with Testbed(cfg, tmp_path) as tb:
        yield tb


def test_system_reset_mid_traffic_then_hotplug(testbed: Testbed) -> None:
    con = GuestConsole(testbed.console_socket or Path())
    con.expect(re.escape(SHELL_READY), 120)
    # Mid-traffic: a TCP stream to the host peer runs while QEMU resets the machine.
    con.send("hnet tcp-send --host 198.18.0.1 --port 5001 --bytes 1099511627776 --seed 1 &\n")
    time.sleep(2)
    before = testbed.device.stats()
    assert before["device"]["totals"]["packets"] > 0 or before["ledger"]["maps"] > 0
    testbed.qmp("system_reset")
    con.expect(re.escape(SHELL_READY), 120)
    after = testbed.device.stats()
    assert after["resets"].get("DEVICE", 0) > before["resets"].get("DEVICE", 0)
    assert after["ledger"]["violations_total"] == 0, after["ledger"]["violations"]
    ping = con.run("ping -c 3 -i 0.2 198.18.0.1")
    assert ping.returncode == 0, ping.output

    # A second device: its own server process, TAP and subnet, hot-added on hp0.
    dev = testbed.add_device()
    testbed.hotplug(dev)
    found = con.run("for i in $(seq 50); do [ -e /sys/class/net/eth1 ] && break; "
                    "usleep 200000; done; cat /sys/class/net/eth1/address; "
                    "readlink /sys/class/net/eth1/device/driver")
    assert found.returncode == 0 and dev.spec.mac in found.output, found.output
    assert found.output.endswith("/virtio_net"), found.output
    up = con.run(f"ip link set eth1 up && ip addr add {dev.spec.guest_address}/24 dev eth1 && "
                 f"ping -c 3 -i 0.2 -w 20 {dev.spec.host_address}")
    assert up.returncode == 0, up.output
    stats = dev.stats()
    assert stats["ledger"]["violations_total"] == 0
    assert stats["tap_backend"]["write_errors"] == 0


def test_device_del_of_a_vfio_user_device_still_aborts_qemu(testbed: Testbed) -> None:
    """Records QEMU 11.1.3's behaviour: if this fails, QEMU no longer aborts on device_del,
    and `harness qmp` can stop refusing it (harness/qmpshell.py)."""
    con = GuestConsole(testbed.console_socket or Path())
    con.expect(re.escape(SHELL_READY), 120)
    dev = testbed.add_device()
    testbed.hotplug(dev)
    con.run("for i in $(seq 50); do [ -e /sys/class/net/eth1 ] && break; usleep 200000; done")
    testbed.qmp("device_del", id=dev.spec.name)
    deadline = time.monotonic() + 20
    while testbed.machine.running() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = (testbed.run_dir / "qemu.log").read_text(errors="replace")
    assert not testbed.machine.running(), "QEMU survived device_del: lift the guard"
    assert "Assertion" in log or "assert" in log.lower(), log[-2000:]
