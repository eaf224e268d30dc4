"""A dead device server is noticed: within 5 s the run says so, with the server's log tail,
instead of waiting for the guest's timeouts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from harness.runner import follow_console
from harness.testbed import PeerSpec, ServerDied, Testbed, TestbedConfig

from .conftest import need_root

pytestmark = pytest.mark.vm


def test_a_killed_server_is_reported_within_5_seconds(tmp_path: Path) -> None:
    need_root()
    cfg = TestbedConfig(cmdline=("harness.bytes=1099511627776",),  # a plan that would take hours
                        peers=PeerSpec(tcp_bytes=1 << 40, timeout=600))
    with Testbed(cfg, tmp_path) as tb:
        tb.wait_console("ok 1 link_up", 120)
        os.kill(tb.device.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ServerDied) as exc:
            follow_console(tb.console_log, tb.machine, 600, alive=tb.check_alive)
        assert time.monotonic() - t0 < 5
        assert "device server net0" in str(exc.value) and "exit status -9" in str(exc.value)
        assert "net0-server.log" in str(exc.value)
