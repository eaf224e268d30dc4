"""Link state with a real guest: the device's link goes down and up (the control command and
`harness link`), and Linux's virtio_net follows it through the config interrupt: carrier off,
no traffic; carrier on, traffic again."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.session import RUN_FILE, run_info
from harness.testbed import SHELL_CMDLINE, Testbed, TestbedConfig

from .conftest import need_root

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]
PING = "ping -c 1 -W 2 198.18.0.1"


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    need_root()
    cfg = TestbedConfig(console="socket", cmdline=SHELL_CMDLINE,
                        peers=None)
    with Testbed(cfg, tmp_path_factory.mktemp("link")) as tb:
        tb.wait_shell(120)
        yield tb


def carrier(tb: Testbed, want: str, within: float = 5.0) -> str:
    """Poll eth0's carrier until it reads ``want`` (or time runs out); the last value read."""
    deadline = time.monotonic() + within
    while True:
        got = tb.guest.run("cat /sys/class/net/eth0/carrier", timeout=10).text.strip()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def ping_again(tb: Testbed, within: float = 10.0) -> int:
    """Ping until one gets through (or time runs out); the last ping's status.

    The first ping after the link comes back may fail through no fault of the device: the
    ping sent while the link was down left 198.18.0.1's neighbour entry INCOMPLETE with its ARP
    probes used up (the guest's qdisc dropped them), so Linux drops the next packet queued on
    it too (seen: no ARP request leaves the guest during that ping). The next ping resolves.
    """
    deadline = time.monotonic() + within
    while True:
        r = tb.guest.run(PING, timeout=15)
        if r.returncode == 0 or time.monotonic() > deadline:
            return r.returncode
        time.sleep(0.2)


def device_stats(tb: Testbed) -> dict[str, object]:
    dev = tb.device.stats()["device"]
    assert isinstance(dev, dict)
    return dev


def test_link_down_and_up_through_the_control_socket(testbed: Testbed) -> None:
    tb = testbed
    assert carrier(tb, "1") == "1"
    assert tb.guest.run(PING, timeout=15).returncode == 0
    irqs = tb.device.stats()["irq"]["sent"]

    assert tb.device.request("link", up=False) == {"ok": True, "up": False, "changed": True}
    assert carrier(tb, "0") == "0"
    r = tb.guest.run(PING, timeout=15)
    assert r.returncode != 0, r.text
    dev = device_stats(tb)
    assert dev["link_up"] is False and dev["link_changes"] == 1
    assert tb.device.stats()["irq"]["sent"] > irqs  # the config interrupt went out

    assert tb.device.request("link", up=True) == {"ok": True, "up": True, "changed": True}
    assert carrier(tb, "1") == "1"
    assert ping_again(tb) == 0
    dev = device_stats(tb)
    assert dev["link_up"] is True and dev["link_changes"] == 2
    assert dev["needs_reset"] is False and dev["errors"] == 0


def test_harness_link_command(testbed: Testbed) -> None:
    tb = testbed
    info = run_info(tb)  # what `harness run` would write: the CLI finds the device through it
    info.write()
    run_dir = str(tb.run_dir)
    try:
        def harness_link(state: str) -> str:
            proc = subprocess.run([sys.executable, "-m", "harness", "link", state,
                                   "--run-dir", run_dir],
                                  cwd=REPO, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        assert harness_link("down") == "net0: link down\n"
        assert carrier(tb, "0") == "0"
        assert tb.guest.run(PING, timeout=15).returncode != 0
        assert harness_link("up") == "net0: link up\n"
        assert carrier(tb, "1") == "1"
        assert ping_again(tb) == 0
    finally:
        (Path(run_dir) / RUN_FILE).unlink(missing_ok=True)
