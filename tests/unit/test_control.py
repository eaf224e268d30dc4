"""The control protocol (harness.server.control) over a real unix socket and a real selector."""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.server.control import (
    MAX_LINE,
    CommandError,
    ControlServer,
    Handler,
    Reply,
    Request,
    device_commands,
)
from harness.server.loop import DeviceLoop
from harness.testing.mockdriver import net_rig
from harness.testing.serverfakes import FakeEndpoint, deadline

DEADLINE = 5.0  # seconds a test waits for an answer before calling it lost


class Rig:
    """A ControlServer in its own selector, pumped by the test between client actions."""

    def __init__(self, path: Path, commands: dict[str, Handler] | None = None,
                 **limits: int) -> None:
        self.stops = 0
        self.stats_payload: dict[str, Any] = {"device": {"rx0": {"packets": 7}}}
        table = device_commands(stats=lambda: self.stats_payload, stop=self._stop)
        table.update(commands or {})
        self.path = path
        self.server = ControlServer.listen(path, table, **limits)
        self.sel = selectors.DefaultSelector()
        self.server.register(self.sel)
        self.clients: list[Client] = []

    def _stop(self) -> None:
        self.stops += 1

    def pump(self, rounds: int = 3) -> None:
        """Handle whatever is ready, a few times over; never waits long."""
        for _ in range(rounds):
            for key, mask in self.sel.select(timeout=0.005):
                key.data(mask)

    def connect(self) -> Client:
        c = Client(self, self.path)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.sock.close()
        self.server.close()
        self.sel.close()


class Client:
    def __init__(self, rig: Rig, path: Path) -> None:
        self.rig = rig
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _receive(self) -> None:
        self.rig.pump()
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    self.eof = True
                    return
                self.buf += data
        except BlockingIOError:
            pass

    def replies(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` reply lines, parsed; fails if they do not come."""
        deadline = time.monotonic() + DEADLINE
        while self.buf.count(b"\n") < n:
            assert not self.eof, f"connection closed after {self.buf!r}"
            assert time.monotonic() < deadline, f"no reply; got {self.buf!r}"
            self._receive()
        lines = self.buf.split(b"\n")
        self.buf = b"\n".join(lines[n:])
        return [json.loads(line) for line in lines[:n]]

    def reply(self, request: bytes) -> dict[str, Any]:
        self.send(request)
        return self.replies(1)[0]

    def nothing_yet(self) -> bool:
        self._receive()
        return self.buf == b"" and not self.eof

    def closed(self) -> bool:
        """Whether the server closed this connection (after any replies it sent)."""
        deadline = time.monotonic() + DEADLINE
        while not self.eof and time.monotonic() < deadline:
            self._receive()
        return self.eof


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "control.sock")
    yield r
    r.close()


def assert_serving(rig: Rig) -> None:
    """The server still answers a fresh client."""
    assert rig.connect().reply(b'{"cmd": "ping"}\n') == {"ok": True}


# ---- the commands ------------------------------------------------------------------------------


def test_ping_stats_quit(rig: Rig) -> None:
    c = rig.connect()
    assert c.reply(b'{"cmd": "ping"}\n') == {"ok": True}
    stats = c.reply(b'{"cmd": "stats"}\n')
    assert stats["ok"] is True and stats["stats"] == rig.stats_payload
    assert stats["control"]["requests"] == 2 and stats["control"]["errors"] == 0
    assert c.reply(b'{"cmd": "quit"}\n') == {"ok": True}
    assert rig.stops == 1
    assert rig.server.errors == 0


class NoLedger:
    def housekeeping(self) -> None:
        pass

    def check_leaks(self, when: str) -> int:
        return 0


def test_quit_stops_the_real_loop(tmp_path: Path) -> None:
    nr = net_rig()
    endpoint = FakeEndpoint(attach_after=10**9)  # QEMU never comes
    loop = DeviceLoop(endpoint, nr.device, NoLedger(), nr.backend)
    path = tmp_path / "control.sock"
    control = ControlServer.listen(path, device_commands(stats=dict, stop=loop.request_stop))
    loop.control = control
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.connect(str(path))
        c.sendall(b'{"cmd": "ping"}\n{"cmd": "quit"}\n')
        with deadline(DEADLINE):
            loop.serve()  # returns once `quit` has been handled
        assert endpoint.attach_calls >= 1 and loop.turns == 0
        control.close()
        c.settimeout(DEADLINE)
        assert c.makefile("rb").read() == b'{"ok": true}\n' * 2
        assert not path.exists()  # close() removed the socket file
    finally:
        c.close()
        loop.close()
        endpoint.close()


# ---- bad requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"[1]", "must be a JSON object, not array"),
        (b'"x"', "must be a JSON object, not string"),
        (b"5", "must be a JSON object, not number"),
        (b"null", "must be a JSON object, not null"),
        (b"{}", 'has no "cmd"'),
        (b'{"cmd": 5}', '"cmd" must be a string, not number'),
        (b'{"cmd": null}', '"cmd" must be a string, not null'),
        (b'{"cmd": ["stats"]}', '"cmd" must be a string, not array'),
        (b'{"cmd": "reboot"}', "unknown command 'reboot' (known: ping, quit, stats)"),
        (b'{"cmd": "stats"', "not JSON"),
        (b"stats", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"cmd": "\xc3"}', "not UTF-8"),
        (b"", "empty request"),
        (b"   \r", "empty request"),
        (b"[" * 30000 + b"]" * 30000, "nested too deeply"),  # RecursionError, under MAX_LINE
    ],
)
def test_bad_request_gets_an_error_reply_and_the_connection_stays(
    rig: Rig, line: bytes, error: str
) -> None:
    c = rig.connect()
    reply = c.reply(line + b"\n")
    assert reply["ok"] is False and error in reply["error"], reply
    assert set(reply) == {"ok", "error"}
    assert rig.server.errors == 1 and rig.server.last_error == reply["error"]
    # Same connection, next request: served.
    assert c.reply(b'{"cmd": "ping"}\n') == {"ok": True}
    assert rig.stops == 0


def test_command_errors_and_handler_bugs_are_error_replies(tmp_path: Path) -> None:
    def picky(_server: ControlServer, request: Request) -> Reply:
        raise CommandError(f"picky needs 'x', got {sorted(request.args)}")

    def buggy(_server: ControlServer, _request: Request) -> Reply:
        raise KeyError("oops")

    def unserializable(_server: ControlServer, _request: Request) -> Reply:
        return {"value": object()}

    rig = Rig(tmp_path / "c.sock", {"picky": picky, "buggy": buggy, "odd": unserializable})
    try:
        c = rig.connect()
        assert c.reply(b'{"cmd": "picky"}\n') == {
            "ok": False, "error": "picky needs 'x', got ['cmd']"}
        reply = c.reply(b'{"cmd": "buggy"}\n')
        assert reply["ok"] is False and "internal error: KeyError" in reply["error"]
        reply = c.reply(b'{"cmd": "odd"}\n')
        assert reply["ok"] is False and "not JSON" in reply["error"]
        assert c.reply(b'{"cmd": "ping"}\n') == {"ok": True}
        assert rig.server.errors == 3
    finally:
        rig.close()


# ---- framing ----------------------------------------------------------------------------------


def test_many_requests_in_one_write_get_one_reply_each_in_order(rig: Rig) -> None:
    c = rig.connect()
    good, bad = b'{"cmd": "ping"}\n', b"[1]\n"
    c.send((good + bad + good) * 200)
    replies = c.replies(600)
    assert [r["ok"] for r in replies] == [True, False, True] * 200
    assert rig.server.requests == 600 and rig.server.errors == 200
    assert c.nothing_yet()  # nothing beyond one reply per request


def test_request_split_across_writes(rig: Rig) -> None:
    c = rig.connect()
    for part in (b'{"cm', b'd": "st', b"ats", b'"}'):
        c.send(part)
        assert c.nothing_yet()  # no reply before the newline
    reply = c.reply(b"\n")
    assert reply["ok"] is True and "stats" in reply


def test_line_of_exactly_max_line_bytes_is_accepted(rig: Rig) -> None:
    c = rig.connect()
    request = b'{"cmd": "ping", "pad": "'
    request += b"x" * (MAX_LINE - len(request) - 2) + b'"}'
    assert len(request) == MAX_LINE
    assert c.reply(request + b"\n") == {"ok": True}


@pytest.mark.parametrize("newline", [b"", b"\n"], ids=["unterminated", "terminated"])
def test_over_long_line_gets_an_error_then_close(rig: Rig, newline: bytes) -> None:
    c = rig.connect()
    c.send(b'{"cmd": "ping"}\n')  # answered before the long line is refused
    c.send(b"x" * (MAX_LINE + 1) + newline)
    ping, refusal = c.replies(2)
    assert ping == {"ok": True}
    assert refusal["ok"] is False and "longer than 65536 bytes" in refusal["error"]
    assert c.closed()
    assert rig.server.clients == 0 and rig.server.errors == 1
    assert_serving(rig)


def test_client_gone_mid_line_is_dropped_cleanly(rig: Rig) -> None:
    c = rig.connect()
    c.send(b'{"cmd": "ping"}\n{"cmd": "pi')
    assert c.replies(1) == [{"ok": True}]
    assert rig.server.clients == 1
    c.sock.close()
    rig.pump()
    assert rig.server.clients == 0
    assert rig.server.errors == 1 and "middle of a request" in rig.server.last_error
    assert_serving(rig)


def test_client_gone_between_requests_is_not_an_error(rig: Rig) -> None:
    c = rig.connect()
    assert c.reply(b'{"cmd": "ping"}\n') == {"ok": True}
    c.sock.close()
    rig.pump()
    assert rig.server.clients == 0 and rig.server.errors == 0


# ---- nobody blocks anybody -----------------------------------------------------------------


def test_stalled_client_does_not_block_another(rig: Rig) -> None:
    slow = rig.connect()
    slow.send(b'{"cmd": "st')  # half a request, then silence
    assert slow.nothing_yet()
    fast = rig.connect()
    started = time.monotonic()
    assert fast.reply(b'{"cmd": "ping"}\n') == {"ok": True}
    assert fast.reply(b'{"cmd": "stats"}\n')["stats"] == rig.stats_payload
    assert time.monotonic() - started < 1.0  # the old server waited 2 s on the slow one
    assert rig.server.clients == 2
    slow.send(b'ats"}\n')  # the slow one finishes later and is answered too
    assert slow.replies(1)[0]["ok"] is True


def test_big_reply_to_a_slow_reader_is_delivered_whole(rig: Rig) -> None:
    rig.stats_payload = {"blob": "y" * (4 << 20)}  # far more than a socket buffer holds
    c = rig.connect()
    c.send(b'{"cmd": "stats"}\n')
    rig.pump()
    assert rig.server.clients == 1  # waiting for the client to read, not dropped
    reply = c.replies(1)[0]
    assert reply["stats"] == rig.stats_payload
    assert_serving(rig)


def test_client_that_never_reads_is_dropped(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "c.sock", max_pending_output=256 << 10)
    rig.stats_payload = {"blob": "z" * (64 << 10)}
    try:
        c = rig.connect()
        for _ in range(40):  # 40 replies of 64 KiB, never read
            c.send(b'{"cmd": "stats"}\n')
            rig.pump()
            if rig.server.clients == 0:
                break
        assert rig.server.clients == 0 and rig.server.dropped == 1
        assert "unread" in rig.server.last_error
        assert_serving(rig)
    finally:
        rig.close()


def test_clients_over_the_limit_are_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "c.sock", max_clients=2)
    try:
        a, b = rig.connect(), rig.connect()
        a.send(b'{"cmd": "pi')
        b.send(b'{"cmd": "pi')
        rig.pump()
        third = rig.connect()
        refusal = third.replies(1)[0]
        assert refusal == {"ok": False, "error": "too many control clients"}
        assert third.closed()
        a.send(b'ng"}\n')
        assert a.replies(1) == [{"ok": True}]
        a.sock.close()
        b.sock.close()
        rig.pump()
        assert_serving(rig)  # a slot is free again
    finally:
        rig.close()


def test_close_ends_connections_and_removes_the_socket(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "c.sock")
    c = rig.connect()
    c.send(b'{"cmd": "ping"}\n')
    rig.pump()
    rig.server.close()
    rig.sel.close()
    c.sock.setblocking(True)
    c.sock.settimeout(DEADLINE)
    assert c.sock.makefile("rb").read() == b'{"ok": true}\n'  # then EOF
    assert not (tmp_path / "c.sock").exists()
    c.sock.close()
