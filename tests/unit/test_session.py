"""harness run's bookkeeping: run.json lookup, and its request socket against garbage."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness import session
from harness.session import RunInfo, RunRequests, find_run, load_run


def info(run_dir: Path, pid: int) -> RunInfo:
    return RunInfo(pid=pid, run_dir=str(run_dir), qmp="q", control=["c"], devices=["net0"],
                   console_socket="s", console_log="l")


def test_find_run_takes_the_live_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "runs_root", lambda: tmp_path)
    with pytest.raises(LookupError, match="no running VM"):
        find_run()
    dead, live = tmp_path / "a", tmp_path / "b"
    dead.mkdir()
    live.mkdir()
    info(dead, 2**22 + 12345).write()  # no such pid
    info(live, os.getpid()).write()
    assert find_run().run_dir == str(live)
    with pytest.raises(LookupError, match="has ended"):
        load_run(dead)
    (live / "run.json").write_text("{not json")
    with pytest.raises(LookupError, match="unreadable"):
        load_run(live)


def ask(path: Path, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        reply = json.loads(s.makefile("rb").readline())
    assert isinstance(reply, dict)
    return reply


@pytest.mark.parametrize("payload", [b"[1]\n", b"\xff\xfe\n", b"not json\n", b'{"cmd": 5}\n',
                                     b'{"cmd": "reboot"}\n', b"\n"])
def test_run_requests_answer_garbage_with_an_error(tmp_path: Path, payload: bytes) -> None:
    tb: Any = SimpleNamespace(run_dir=tmp_path, cfg=SimpleNamespace(hotplug_ports=0))
    req = RunRequests(tb)
    try:
        t = threading.Thread(target=req.serve_one)
        t.start()
        reply = ask(req.path, payload)
        t.join(5)
        assert reply["ok"] is False and reply["error"]
    finally:
        req.close()
    assert not req.path.exists()


def test_hotplug_refused_when_no_port_is_free(tmp_path: Path) -> None:
    tb: Any = SimpleNamespace(run_dir=tmp_path, cfg=SimpleNamespace(hotplug_ports=0))
    req = RunRequests(tb)
    try:
        reply = req.handle({"cmd": "hotplug"})
    finally:
        req.close()
    assert reply == {"ok": False, "error": "all 0 hot-plug ports are taken "
                                           "(harness run --hotplug-ports N)"}


def test_exec_serves_requests_while_its_command_runs(tmp_path: Path) -> None:
    """`harness run --exec` blocks on its command; `harness hotplug` must still get an answer
    (session.serving), and nothing is left serving afterwards."""
    tb: Any = SimpleNamespace(run_dir=tmp_path, cfg=SimpleNamespace(hotplug_ports=0))
    req = RunRequests(tb)
    run = RunInfo(pid=os.getpid(), run_dir=str(tmp_path), qmp="", control=[], devices=[],
                  console_socket="", console_log="")
    try:
        with session.serving(req, poll=0.01):
            reply = session.request(run, "hotplug", timeout=2.0)  # as the blocked caller
        assert reply == {"ok": False, "error": "all 0 hot-plug ports are taken "
                                               "(harness run --hotplug-ports N)"}
        assert not any(t.name == "run-requests" for t in threading.enumerate())
    finally:
        req.close()
