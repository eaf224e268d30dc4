"""Process lifetime: children die with the harness, signals unwind like Ctrl-C, stale netns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.net.netns import owner_alive, stale

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent is gone; init reaps it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_child_dies_when_the_harness_dies(tmp_path: Path, sig: int) -> None:
    """The middle process plays the harness: it starts a long sleep through harness.proc and
    is then killed; the sleep must not outlive it."""
    pidfile = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import time
        from harness.proc import popen
        child = popen(["sleep", "60"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """)
    harness = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the middle process never started its child"
        time.sleep(0.02)
    child = int(pidfile.read_text())
    assert _alive(child)
    harness.send_signal(sig)
    harness.wait(10)
    try:
        assert _wait_gone(child, 5), f"child {child} outlived its parent killed by {sig}"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129),
                                             (signal.SIGINT, 130)])
def test_signals_unwind_like_ctrl_c(sig: int, status: int) -> None:
    script = textwrap.dedent("""
        import sys, time
        from harness import proc
        try:
            with proc.interrupts():
                try:
                    print("ready", flush=True)
                    time.sleep(30)
                finally:
                    proc.note_cleanup("the thing")
        except KeyboardInterrupt as exc:
            print("cleaned up:", ", ".join(proc.cleanup_journal), flush=True)
            sys.exit(proc.exit_status(exc))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    out, err = p.communicate(timeout=10)
    assert p.returncode == status
    assert "cleaned up: the thing" in out
    assert "Traceback" not in err


def test_stale_namespaces_are_those_whose_owner_is_gone() -> None:
    names = ["hns-100-abcdef", "hns-200-012345", "other-100-abcdef", "hns-x-abcdef", "hns"]
    assert stale(names, alive=lambda pid: pid == 200) == ["hns-100-abcdef"]


def test_owner_alive_sees_this_python_and_not_a_dead_pid(tmp_path: Path) -> None:
    assert owner_alive(os.getpid())
    p = subprocess.Popen(["sleep", "0"])
    p.wait()
    assert not owner_alive(p.pid)
    assert not owner_alive(1)  # init is not a harness


def test_an_interrupted_command_names_the_signal_and_what_it_stopped(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import proc

    monkeypatch.setattr(proc, "cleanup_journal", [])
    assert proc.report_interrupted("harness fuzz", KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == ("harness fuzz: interrupted (SIGINT), cleaned up: "
                                       "nothing was running\n")
    proc.note_cleanup("QEMU (pid 7)")
    proc.note_cleanup("netns hns-1-abcdef")
    assert proc.report_interrupted("roundtrip", proc.Interrupted(signal.SIGTERM)) == 143
    assert capsys.readouterr().err == ("roundtrip: interrupted (SIGTERM), cleaned up: "
                                       "QEMU (pid 7), netns hns-1-abcdef\n")
