"""The guest command channel with a real guest: guest/agent on ttyS1, GuestAgent on the host,
through QEMU's second serial port, while the device under test carries the guest's traffic.
One boot serves every test here (each leaves the agent serving); `harness run --exec` boots
its own.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.guest.agentwire import Err
from harness.testbed import SHELL_CMDLINE, Testbed, TestbedConfig

from .conftest import need_root

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    need_root()
    cfg = TestbedConfig(console="socket", cmdline=SHELL_CMDLINE,
                        peers=None)
    with Testbed(cfg, tmp_path_factory.mktemp("agent")) as tb:
        tb.wait_shell(120)
        yield tb


def test_stdout_stderr_and_status_come_back_apart(testbed: Testbed) -> None:
    r = testbed.guest.run("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.returncode, r.timed_out) == (b"out\n", b"err\n", 3, False)


def test_binary_output_is_exact(testbed: Testbed) -> None:
    r = testbed.guest.run("head -c 4096 /dev/urandom | tee /tmp/r | sha256sum")
    assert r.returncode == 0, r.stderr
    back = testbed.guest.run("cat /tmp/r")
    assert len(back.stdout) == 4096
    assert hashlib.sha256(back.stdout).hexdigest() == r.text.split()[0]


def test_put_a_file_and_read_it_back(testbed: Testbed) -> None:
    data = os.urandom(100_000)  # several chunks
    start = time.monotonic()
    testbed.guest.put("/tmp/in/blob", data, mode=0o600)
    took = time.monotonic() - start
    r = testbed.guest.run("sha256sum /tmp/in/blob; stat -c %a /tmp/in/blob")
    digest, _, mode = r.text.split()
    assert digest == hashlib.sha256(data).hexdigest() and mode == "600"
    assert testbed.guest.run("cat /tmp/in/blob").stdout == data
    print(f"put 100000 bytes in {took:.2f} s")


def test_a_command_that_times_out(testbed: Testbed) -> None:
    start = time.monotonic()
    r = testbed.guest.run("echo started; sleep 600", timeout=2)
    assert r.timed_out and r.returncode == 137 and r.stdout == b"started\n"
    assert time.monotonic() - start < 10
    assert testbed.guest.run("ps | grep -c '[s]leep 600'").text.strip() == "0"


def test_garbage_does_not_kill_the_agent(testbed: Testbed) -> None:
    testbed.guest.send_raw(b"\x00\xff garbage \x1b[2J\nrun 1 2 3\n\n$(poweroff -f)\n")
    assert testbed.guest.run("echo alive").stdout == b"alive\n"
    assert sum(isinstance(r, Err) for r in testbed.guest.stray) >= 3


def test_ping_through_the_agent_uses_the_device_under_test(testbed: Testbed) -> None:
    before = testbed.device.stats()["device"]["totals"]["packets"]
    r = testbed.guest.run("ping -c 3 -i 0.2 -w 20 198.18.0.1", timeout=30)
    assert r.returncode == 0, r.text + r.stderr.decode()
    assert "3 packets transmitted, 3 packets received" in r.text
    assert testbed.device.stats()["device"]["totals"]["packets"] >= before + 6


def test_harness_run_exec_exits_with_the_commands_status() -> None:
    need_root()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--exec",
                           "echo hi; echo oops >&2; exit 7"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "hi\n"
    assert "oops" in proc.stderr
    print(f"harness run --exec took {time.monotonic() - start:.1f} s")
