"""Runs leave nothing behind: `harness vm-test` killed mid-run by SIGTERM or SIGKILL.

A real run is started (a long transfer keeps it busy), and once the guest is running its
plan the orchestrator is killed. Every child it started (device server, host peer, QEMU)
must be gone within seconds; after SIGTERM the namespace is gone too and the command says
what it cleaned up; after SIGKILL the next run's stale-namespace sweep removes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import netns

from harness.net.netns import remove_stale

from .conftest import need_root

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(out: Path) -> tuple[subprocess.Popen[str], list[int], str]:
    """A vm-test whose guest is mid-plan: (process, its children, its namespace)."""
    need_root()
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "vm-test", "--tcp-bytes", "4G", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    console = out / "latest" / "console.log"
    deadline = time.monotonic() + 180
    while not (console.exists() and "ok 1 " in console.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never got going: {proc.communicate()}")
        time.sleep(0.2)
    children = _children(proc.pid)
    names = [n for n in netns.listnetns() if n.startswith(f"hns-{proc.pid}-")]
    assert len(children) >= 3, f"expected server, peer and QEMU, found {children}"
    assert len(names) == 1
    return proc, children, names[0]


def _gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(map(_alive, pids)):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_sigterm_mid_run_cleans_up_and_says_so(tmp_path: Path) -> None:
    proc, children, ns = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "harness vm-test: interrupted (SIGTERM), cleaned up:" in err
    assert "QEMU" in err and ns in err
    assert "Traceback" not in err
    assert _gone(children, 5) == []
    assert ns not in netns.listnetns()


def test_sigkill_leaves_no_process_and_the_next_run_removes_the_netns(tmp_path: Path) -> None:
    proc, children, ns = _start(tmp_path)
    proc.kill()
    proc.communicate(timeout=10)
    left = _gone(children, 5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "children outlived a SIGKILLed orchestrator"
    assert ns in netns.listnetns()  # nothing ran to remove it...
    assert ns in remove_stale()  # ...until the next run's sweep
    assert ns not in netns.listnetns()
