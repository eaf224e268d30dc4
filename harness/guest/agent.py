"""The guest command channel: run commands in the guest and copy files in, over a serial port
that has nothing to do with the network device under test.

The guest side is `guest/agent` (a busybox sh script), started by /init on /dev/ttyS1, which QEMU
connects to a unix socket (`MachinePaths.agent_socket`, `agent.sock` in a Testbed's run
directory). This module is the host side:

    agent = GuestAgent(run_dir / "agent.sock")
    agent.wait_ready(120)
    r = agent.run("ping -c 3 198.18.0.1", timeout=30)   # r.returncode, r.stdout, r.stderr
    agent.put("/tmp/prog", data, mode=0o755)

The protocol (request and reply lines, what each request does) is harness.guest.agentwire's;
this module is the client: readiness, one request at a time, timeouts and resynchronisation.

Anything else on the line (a garbled line, a reply to a request the host gave up on) is not an
error for the host: it is kept in `GuestAgent.stray` and ignored. The kernel never writes to
ttyS1 (its console is ttyS0), so in practice the channel carries only the agent.

Errors (all `AgentError`):

    AgentError
     |- AgentNotReady    no agent answered within wait_ready's timeout
     |- AgentTimeout     a request got no reply in time (the next request resynchronises)
     |- AgentClosed      the socket closed: QEMU exited
     |- AgentRestarted   the agent announced `ready` while a request was outstanding
     |- RemoteError      the agent answered `err` (.message)
     '- CommandFailed    CommandResult.check_returncode() on a non-zero status (.result)

A GuestAgent is not thread-safe; QEMU serves one client per socket at a time.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import math
import secrets
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

from harness.guest.agentwire import (
    CHUNK,
    Done,
    Err,
    Ok,
    Pong,
    Ready,
    Reply,
    encode_commit,
    encode_ping,
    encode_put,
    encode_run,
    parse_reply,
)

log = logging.getLogger(__name__)

#: The longest reply line accepted (a command's base64 stdout and stderr together).
MAX_REPLY = 256 << 20
#: How long a reply may take beyond the request's own timeout while nothing arrives.
REPLY_MARGIN = 30.0



# -- errors ------------------------------------------------------------------------------------


class AgentError(Exception):
    """Something went wrong talking to the guest agent."""


class AgentNotReady(AgentError, TimeoutError):
    """No agent answered within wait_ready's timeout."""


class AgentTimeout(AgentError, TimeoutError):
    """A request got no reply in time; `request` is the line that was sent."""

    def __init__(self, message: str, request: bytes) -> None:
        super().__init__(message)
        self.request = request


class AgentClosed(AgentError, ConnectionError):
    """The socket closed (QEMU exited, or another client took the agent)."""


class AgentRestarted(AgentError):
    """The agent announced `ready` while a request was outstanding: the request is lost."""


class RemoteError(AgentError):
    """The agent refused a request; `message` says why, `request` is the line sent."""

    def __init__(self, message: str, request: bytes) -> None:
        super().__init__(f"the guest agent refused the request: {message}")
        self.message = message
        self.request = request


class CommandFailed(AgentError):
    """A guest command exited non-zero (raised by CommandResult.check_returncode)."""

    def __init__(self, result: CommandResult) -> None:
        what = "timed out" if result.timed_out else f"exited with status {result.returncode}"
        err = result.stderr.decode(errors="replace").strip()[-500:]
        super().__init__(f"guest command {result.args!r} {what}" + (f": {err}" if err else ""))
        self.result = result


class LineSplitter:
    """Bytes in, complete lines out (without "\\n"); a line over `limit` raises AgentError."""

    def __init__(self, limit: int = MAX_REPLY) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._scanned = 0  # no newline before this offset: long replies are scanned once

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines: list[bytes] = []
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buf)
                if len(self._buf) > self.limit:
                    self._buf.clear()
                    self._scanned = 0
                    raise AgentError(f"a reply line longer than {self.limit} bytes")
                return lines
            lines.append(bytes(self._buf[:end]))
            del self._buf[:end + 1]
            self._scanned = 0

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line."""
        return len(self._buf)


_R = TypeVar("_R", Ready, Pong, Ok, Err, Done)


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    """What a guest command did, like subprocess.CompletedProcess (args is the command)."""

    args: str
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False

    @property
    def text(self) -> str:
        """stdout as text (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")

    def check_returncode(self) -> None:
        if self.returncode != 0 or self.timed_out:
            raise CommandFailed(self)


# -- transport ---------------------------------------------------------------------------------


class Channel(Protocol):
    """A byte stream to the agent: QEMU's chardev socket, or a pty in the unit tests."""

    def send(self, data: bytes, timeout: float) -> None: ...

    def recv(self, timeout: float) -> bytes | None:
        """Some bytes; None if none came within `timeout`; b"" once the peer has closed."""
        ...

    def close(self) -> None: ...


class SocketChannel:
    """A connected unix stream socket (QEMU's `-chardev socket,server=on`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, path: Path, timeout: float) -> SocketChannel:
        """Connect, retrying while the socket does not exist yet or refuses."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise AgentClosed(f"cannot connect to the guest agent socket {path}") from None
                time.sleep(0.1)

    def send(self, data: bytes, timeout: float) -> None:
        self.sock.settimeout(max(timeout, 0.01))
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise AgentTimeout("the guest does not read its agent port", data) from None
        except OSError as exc:
            raise AgentClosed(f"the guest agent socket closed: {exc}") from None

    def recv(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return None
        try:
            return self.sock.recv(1 << 16)
        except OSError:
            return b""

    def close(self) -> None:
        self.sock.close()


# -- the client --------------------------------------------------------------------------------


class GuestAgent:
    """The host's end of the guest command channel (see the module docstring).

    Connects on first use; the first request waits up to `ready_timeout` for the agent (the
    guest may still be booting). Not thread-safe.
    """

    def __init__(self, socket_path: Path | str, *, ready_timeout: float = 120.0) -> None:
        self.socket_path = Path(socket_path)
        self.ready_timeout = ready_timeout
        self._channel: Channel | None = None
        self._lines = LineSplitter()
        self._pending: collections.deque[bytes] = collections.deque()
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(3)  # a reply to a previous client is never ours
        self._ready = False
        #: The agent's version, from its `ready` line (None until one was seen).
        self.version: str | None = None
        #: Replies nobody waited for, and lines that were not replies (newest last).
        self.stray: collections.deque[Reply | bytes] = collections.deque(maxlen=64)

    @classmethod
    def over(cls, channel: Channel, *, ready_timeout: float = 120.0) -> GuestAgent:
        """A client on an already open channel (tests: a pty to the script on the host)."""
        agent = cls("<channel>", ready_timeout=ready_timeout)
        agent._channel = channel
        return agent

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._ready = False

    # -- requests ------------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> None:
        """Return once the agent answers (a `pong`, or its `ready` line); AgentNotReady if it
        does not within `timeout` (default: ready_timeout)."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        channel = self._connect(deadline)
        while True:
            req_id = self._next_id()
            channel.send(b"\n" + encode_ping(req_id), max(deadline - time.monotonic(), 1.0))
            # One ping a second: pings sent while the guest boots wait in the UART and the
            # socket, and the agent answers each once it starts.
            reply = self._await(req_id, min(deadline, time.monotonic() + 1.0), ready_ok=True)
            if reply is not None:
                self._ready = True
                return
            if time.monotonic() >= deadline:
                raise AgentNotReady(f"no guest agent answered on {self.socket_path} within "
                                    f"{timeout:.0f} s (is guest/agent in the image, and "
                                    "/dev/ttyS1 in the guest?)")

    def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time of one `ping`, in seconds."""
        start = time.monotonic()
        req_id = self._next_id()
        self._expect(self._request(req_id, encode_ping(req_id), timeout), Pong)
        return time.monotonic() - start

    def run(self, cmd: str, *, timeout: float = 60.0, stdin: bytes | None = None) -> CommandResult:
        """Run `sh -c cmd` in the guest (stdin: the given bytes, else /dev/null).

        `timeout` (rounded up to whole seconds) is enforced in the guest: the command's process
        group is killed and the result says `timed_out`. Raises AgentError only when the
        channel fails or the agent refuses the request.
        """
        seconds = max(1, math.ceil(timeout))
        req_id = self._next_id()
        reply = self._request(req_id, encode_run(req_id, cmd, seconds, stdin), seconds)
        done = self._expect(reply, Done)
        return CommandResult(cmd, done.returncode, done.stdout, done.stderr, done.timed_out)

    def put(self, path: str, data: bytes, mode: int = 0o644, *, timeout: float = 60.0) -> None:
        """Write `data` to the absolute guest path `path` (parent directories created) with
        permission bits `mode`; the file appears whole (renamed into place) or not at all."""
        for offset in range(0, max(len(data), 1), CHUNK):
            req_id = self._next_id()
            line = encode_put(req_id, path, offset, data[offset:offset + CHUNK])
            self._expect(self._request(req_id, line, timeout), Ok)
        req_id = self._next_id()
        line = encode_commit(req_id, path, mode, len(data), hashlib.sha256(data).hexdigest())
        self._expect(self._request(req_id, line, timeout), Ok)

    def send_raw(self, data: bytes) -> None:
        """Write bytes to the agent's port as they are (tests of the agent's robustness)."""
        self._connect(time.monotonic() + self.ready_timeout).send(data, 10.0)

    # -- internals ------------------------------------------------------------------------

    def _next_id(self) -> str:
        return f"{self._prefix}.{next(self._ids)}"

    def _connect(self, deadline: float) -> Channel:
        if self._channel is None:
            left = max(deadline - time.monotonic(), 0.1)
            self._channel = SocketChannel.connect(self.socket_path, left)
        return self._channel

    def _request(self, req_id: str, line: bytes, timeout: float) -> Reply:
        if not self._ready:
            self.wait_ready()
        channel = self._connect(time.monotonic() + self.ready_timeout)
        channel.send(b"\n" + line, timeout + REPLY_MARGIN)
        reply = self._await(req_id, time.monotonic() + timeout + REPLY_MARGIN)
        if reply is None:
            self._ready = False  # the next request first makes sure the agent is there
            raise AgentTimeout(f"no reply from the guest agent within {timeout:.0f} s + "
                               f"{REPLY_MARGIN:.0f} s to {line[:80]!r}", line)
        if isinstance(reply, Err):
            raise RemoteError(reply.message, line)
        return reply

    def _await(self, req_id: str, deadline: float, *, ready_ok: bool = False) -> Reply | None:
        """The reply to `req_id`, or None at the deadline. A long reply that is still arriving
        moves the deadline: it must only not stall for REPLY_MARGIN."""
        assert self._channel is not None
        while True:
            while self._pending:
                line = self._pending.popleft()
                reply = parse_reply(line)
                if isinstance(reply, Ready):
                    self.version = reply.version
                    if ready_ok:
                        return reply
                    self._ready = True
                    raise AgentRestarted("the guest agent restarted (guest reboot?) while a "
                                         "request was outstanding")
                if reply is not None and reply.id == req_id:
                    return reply
                if ready_ok and isinstance(reply, Pong) and reply.id.startswith(self._prefix + "."):
                    return reply  # an earlier ping of ours, answered late: the agent is up
                log.debug("stray line from the guest agent: %r", line[:200])
                self.stray.append(reply if reply is not None else line)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            data = self._channel.recv(min(left, 1.0))
            if data is None:
                continue
            if not data:
                self.close()
                raise AgentClosed("the guest agent's socket closed (QEMU exited?)")
            self._pending.extend(self._lines.feed(data))
            if self._lines.pending:
                deadline = max(deadline, time.monotonic() + REPLY_MARGIN)

    @staticmethod
    def _expect(reply: Reply, kind: type[_R]) -> _R:
        if not isinstance(reply, kind):
            raise AgentError(f"the guest agent answered {reply!r}, expected {kind.__name__}")
        return reply
