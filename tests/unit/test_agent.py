"""The guest command channel without a VM: the host's framing as pure functions, and the real
guest/agent script run by the guest's own busybox on a pty, driven by the real GuestAgent."""

from __future__ import annotations

import base64
import hashlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import paths
from harness.guest import agent as ga
from harness.guest import agentwire as wire
from harness.guest.agent import (
    CommandFailed,
    CommandResult,
    GuestAgent,
    LineSplitter,
    RemoteError,
)
from harness.guest.agentwire import (
    Done,
    Err,
    Ok,
    Pong,
    Ready,
    encode_commit,
    encode_put,
    encode_run,
    parse_reply,
)

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "guest" / "agent"


# -- framing ---------------------------------------------------------------------------------


def test_run_request_is_one_ascii_line_of_base64_fields() -> None:
    line = encode_run("a.1", "echo 'hi'\nexit 3", 5, b"\x00\xff")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    verb, rid, secs, cmd, stdin = line.decode("ascii").split()
    assert (verb, rid, secs) == ("run", "a.1", "5")
    assert base64.b64decode(cmd) == b"echo 'hi'\nexit 3" and base64.b64decode(stdin) == b"\0\xff"
    assert encode_run("a.2", "true", 1).split()[-1] == b"-"  # no stdin


def test_requests_refuse_what_the_agent_would_refuse() -> None:
    with pytest.raises(ValueError, match="id"):
        encode_run("has space", "true", 1)
    with pytest.raises(ValueError, match="seconds"):
        encode_run("a", "true", 0)
    with pytest.raises(ValueError, match="put the input in a file"):
        encode_run("a", "cat", 1, b"x" * wire.MAX_REQUEST)
    with pytest.raises(ValueError, match="absolute"):
        encode_put("a", "relative/path", 0, b"")
    with pytest.raises(ValueError, match="mode"):
        encode_commit("a", "/x", 0o17777, 0, "0" * 64)


def test_put_and_commit_fields() -> None:
    assert encode_put("i", "/tmp/f", 0, b"") == f"put i {wire.b64(b'/tmp/f')} 0 -\n".encode()
    commit = encode_commit("i", "/tmp/f", 0o755, 3, "ab" * 32).decode().split()
    assert commit[3:] == ["0755", "3", "ab" * 32]
    assert len(encode_put("i", "/" + "p" * 200, 0, b"x" * wire.CHUNK)) < wire.MAX_REQUEST


def test_parse_replies() -> None:
    out, err = wire.b64(b"\x00bin\nary\xff"), wire.b64(b"")
    assert parse_reply(f"done x.1 3 0 {out} {err}".encode()) == Done(
        "x.1", 3, False, b"\x00bin\nary\xff", b"")
    assert parse_reply(b"done x.1 137 1 - -") == Done("x.1", 137, True, b"", b"")
    assert parse_reply(b"ready harness-agent 1") == Ready("1")
    assert parse_reply(b"pong p.2") == Pong("p.2")
    assert parse_reply(b"ok p.3\r") == Ok("p.3")
    assert parse_reply(b"err - " + base64.b64encode(b"unknown request")) == Err(
        "-", "unknown request")


@pytest.mark.parametrize("line", [
    b"", b"garbage", b"done x.1 3 0 -", b"done x.1 three 0 - -", b"done x.1 0 2 - -",
    b"done x.1 0 0 !!!! -", b"done x.1 0 0 abc -", b"ok bad/id", b"\xff\xfe", b"pong",
    b"[    1.234] serial8250: ttyS1 at I/O 0x2f8", b"ready something-else 1",
])
def test_noise_is_not_a_reply(line: bytes) -> None:
    assert parse_reply(line) is None


def test_line_splitter_joins_pieces_and_bounds_lines() -> None:
    s = LineSplitter(limit=16)
    assert s.feed(b"ok a") == [] and s.pending == 4
    assert s.feed(b".1\npong b") == [b"ok a.1"]
    assert s.feed(b"\n\nx\n") == [b"pong b", b"", b"x"] and s.pending == 0
    with pytest.raises(ga.AgentError, match="longer than 16"):
        s.feed(b"y" * 17)
    assert s.feed(b"z\n") == [b"z"]  # the over-long line was dropped, framing goes on


def test_command_result() -> None:
    r = CommandResult("x", 0, b"caf\xc3\xa9 \xff", b"")
    assert r.text == "café \ufffd"
    r.check_returncode()
    with pytest.raises(CommandFailed, match="status 3: boom"):
        CommandResult("x", 3, b"", b"boom\n").check_returncode()
    with pytest.raises(CommandFailed, match="timed out"):
        CommandResult("x", 137, b"", b"", timed_out=True).check_returncode()


# -- the real script on a pty ------------------------------------------------------------------


class PtyChannel:
    """The master side of a pty whose slave the agent serves (as QEMU's socket is for ttyS1)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, data: bytes, timeout: float) -> None:
        view = memoryview(data)
        while view:
            _, writable, _ = select.select([], [self.fd], [], timeout)
            if not writable:
                raise ga.AgentTimeout("pty full", data)
            view = view[os.write(self.fd, view):]

    def recv(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return None
        try:
            return os.read(self.fd, 1 << 16)
        except OSError:  # EIO: no slave open (the agent is reopening the port)
            time.sleep(0.05)
            return None

    def close(self) -> None:
        os.close(self.fd)


def _busybox() -> Path:
    try:
        busybox = paths.load_env().busybox
    except Exception:
        busybox = paths.cache_dir() / "guest" / "busybox"
    if not busybox.exists():
        pytest.skip("no busybox in the cache (make deps)")
    return busybox


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[GuestAgent]:
    """guest/agent under the guest's busybox, every command resolving to a busybox applet."""
    busybox = _busybox()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        (bindir / applet).symlink_to(busybox)
    master, slave = os.openpty()
    tty = os.ttyname(slave)
    env = {"PATH": str(bindir), "HARNESS_AGENT_WORK": str(tmp_path / "work")}
    # The agent hard-codes the guest's PATH; point it at our applets the way /bin is in the guest.
    script = tmp_path / "agent"
    script.write_text(AGENT.read_text().replace("PATH=/bin:/sbin:/usr/bin:/usr/sbin",
                                                f"PATH={bindir}", 1))
    proc = subprocess.Popen([busybox, "sh", str(script), tty], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    client = GuestAgent.over(PtyChannel(master), ready_timeout=10)
    try:
        client.wait_ready(10)
        yield client
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        client.close()
        os.close(slave)  # held open throughout, so the pty never hangs up between agents


def test_the_script_checks_as_posix_sh() -> None:
    busybox = _busybox()
    check = subprocess.run([busybox, "sh", "-n", str(AGENT)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert os.access(AGENT, os.X_OK), "guest/agent must be executable (init checks -x)"


def test_run_returns_stdout_stderr_and_status(agent: GuestAgent) -> None:
    r = agent.run("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.returncode, r.timed_out) == (b"out\n", b"err\n", 3, False)
    assert agent.run("true").stdout == b""
    assert agent.run("kill -TERM $$").returncode == 128 + signal.SIGTERM


def test_binary_output_and_stdin_survive(agent: GuestAgent) -> None:
    blob = bytes(range(256)) * 40 + b"\n\r\x03\x04\x11\x13"
    r = agent.run("cat", stdin=blob)
    assert r.returncode == 0 and r.stdout == blob
    assert agent.run("cat").stdout == b""  # no stdin: /dev/null, never the agent's port
    r = agent.run("head -c 3000 /dev/urandom | tee r.bin | sha256sum; cat r.bin")
    digest, data = r.stdout[:64], r.stdout[r.stdout.index(b"\n") + 1:]
    assert len(data) == 3000 and hashlib.sha256(data).hexdigest().encode() == digest


def test_put_writes_whole_files(agent: GuestAgent, tmp_path: Path) -> None:
    data = os.urandom(2 * wire.CHUNK + 123)
    target = tmp_path / "new" / "dir" / "file.bin"
    agent.put(str(target), data, mode=0o750)
    assert target.read_bytes() == data and (target.stat().st_mode & 0o7777) == 0o750
    assert not target.with_name("file.bin.agent-part").exists()
    agent.put(str(target), b"")  # empty, and replaces what was there
    assert target.read_bytes() == b"" and (target.stat().st_mode & 0o7777) == 0o644
    with pytest.raises(RemoteError, match="is a directory"):
        agent.put(str(tmp_path), b"x")


def test_put_detects_a_lost_chunk(agent: GuestAgent, tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    agent._request("q.1", encode_put("q.1", path, 0, b"abc"), 5)
    with pytest.raises(RemoteError, match="has 3 bytes, not 4"):
        agent._request("q.2", encode_put("q.2", path, 4, b"d"), 5)
    with pytest.raises(RemoteError, match="damaged"):
        agent._request("q.3", encode_commit("q.3", path, 0o644, 3, "0" * 64), 5)
    assert not (tmp_path / "f").exists()


def test_timeout_kills_the_whole_command(agent: GuestAgent) -> None:
    # A duration of this process's own: another test run on the machine (a second checkout's
    # suite) must not be taken for a survivor of this one.
    nap = f"sleep {7000 + os.getpid() % 100_000}"
    start = time.monotonic()
    r = agent.run(f"{nap} & {nap}; echo never", timeout=1)
    assert r.timed_out and r.returncode == 137 and r.stdout == b""
    assert time.monotonic() - start < 5
    left = subprocess.run(["pgrep", "-x", "-f", nap], capture_output=True, text=True)
    assert left.stdout == "", "the timed-out command's process group was not killed"
    assert not agent.run("sleep 1", timeout=3).timed_out


@pytest.mark.parametrize("garbage", [
    b"garbage\n", b"run\n", b"run x.1\n", b"run x.1 1e3 ZWNobw== -\n", b"run x.1 1 !!!! -\n",
    b"run x.1 99999999999 ZWNobw== -\n", b"put x.1 cmVs 0 -\n", b"put x.1 Lw== -1 -\n",
    b"commit x.1 L3RtcC94 999 0 abc\n", b"ping bad/id\n", b"\xff\xfe\x00\x01\n", b"* ? [\n",
    b"$(reboot) `halt` ; exit\n", b"run x.1 1 " + b"A" * 20000 + b"\n", b"half a line",
])
def test_garbage_gets_an_error_and_the_agent_keeps_serving(agent: GuestAgent,
                                                           garbage: bytes) -> None:
    agent.send_raw(garbage)
    assert agent.run("echo alive").stdout == b"alive\n"
    errors = [r for r in agent.stray if isinstance(r, Err)]
    assert errors, list(agent.stray)


def test_a_stale_reply_is_not_taken_for_the_answer(agent: GuestAgent) -> None:
    agent.send_raw(b"\nrun old.1 1 " + wire.b64(b"echo stale").encode() + b" -\n")
    assert agent.run("echo fresh").stdout == b"fresh\n"
    assert any(isinstance(r, Done) and r.stdout == b"stale\n" for r in agent.stray)


def test_a_restarted_agent_is_noticed(agent: GuestAgent) -> None:
    with pytest.raises(ga.AgentRestarted):
        # The request's subshell is $PPID; its parent, the serving loop, is restarted, says
        # `ready` while this command still sleeps, and its late `done` is a stray reply.
        agent.run("kill $(cut -d' ' -f4 /proc/$PPID/stat); sleep 3")
    assert agent.run("echo back").stdout == b"back\n"
