"""The control protocol: JSON-lines requests on a unix stream socket, served without blocking.

Schema. A client connects to the ``--control`` socket and sends requests, one per line: a UTF-8
JSON object with a string ``"cmd"`` (further keys are the command's arguments), at most
``MAX_LINE`` bytes before its ``\\n``. It may send many on one connection, in one write or split
across writes; each gets exactly one reply line, in order::

    request:  {"cmd": "<name>", ...}
    success:  {"ok": true, ...}                  the command's result keys
    failure:  {"ok": false, "error": "<why>"}    the connection stays open

    ping   -> {"ok": true}                                  liveness, costs nothing
    stats  -> {"ok": true, "stats": {...}, "control": {...}}
              stats: the device counters (the --stats file without its exit-only keys):
                device.<queue>: avail_idx (the guest's, as last read), last_avail, used_idx,
                kicks, interrupts, interrupts_suppressed, chains, packets, bytes, drops,
                errors, ...; ledger: map-ops and ledger counters, iova_space (occupancy)
              control: this server's counters (clients, requests, errors, dropped)
    dump-queue {"queue": N}
           -> {"ok": true, "dump": {...}}                   queue N's rings decoded: size,
              addresses, device indices, avail {flags idx used_event ring}, used {flags idx
              avail_event ring}, descriptors [{addr len flags next}], in_flight [{slot idx
              state head descriptors read_len write_len error?}], error? (what is wrong)
              failure: "queue" missing or not an integer, no such queue, queue not enabled
    link {"up": true|false}
           -> {"ok": true, "up": bool, "changed": bool}    set the link state (virtio-net
              config status LINK_UP; a change raises a config interrupt); up is the new state
              failure: "up" missing or not a boolean
    announce -> {"ok": true, "announces": N}              ask the driver to announce itself
              (VIRTIO_NET_S_ANNOUNCE + config interrupt; its ANNOUNCE_ACK clears the bit); N:
              announcements requested so far; failure: GUEST_ANNOUNCE not offered/negotiated
    misbehave {"case": "<name>", "after": N?, "queue": "rx0|tx0|any"?, "always": bool?}
           -> {"ok": true, "misbehave": "<spec>"}           switch a misbehaviour on
              (harness.virtio.misbehave); failure: unknown case, bad after/queue/always
    quit   -> {"ok": true}                                  then the device process stops

Anything else gets a failure reply: invalid UTF-8, invalid JSON, JSON that is not an object,
a missing or non-string ``"cmd"``, an unknown command. A line longer than ``MAX_LINE`` gets a
failure reply and the connection is closed. A client whose unread replies exceed
``MAX_PENDING_OUTPUT`` when another reply is due is dropped; so is one over ``MAX_CLIENTS``.

Nothing here blocks: every socket is non-blocking and registered in the event loop's selector
(each registration's ``data`` is the callable that handles its events), and each client has its
own bounded input and output buffers. A slow client costs the loop nothing but its buffers.

Errors (exceptions in this module)::

    ControlError        the base; never escapes ControlServer
     |- RequestError    the request line is malformed (encoding, JSON, shape)
     '- CommandError    a command refused its arguments; its handler raises it

Every failure reply, dropped client and refused connection adds one to ``errors``.
Commands live in one table, built by :func:`device_commands`; add new ones there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from harness.virtio.misbehave import Misbehaviour

log = logging.getLogger(__name__)

#: Longest request line in bytes, not counting its newline.
MAX_LINE = 64 * 1024
#: Unsent reply bytes a client may have queued when another reply is due; beyond: dropped.
#: (Checked before adding, so a single large stats reply always goes out.)
MAX_PENDING_OUTPUT = 1024 * 1024
#: Connections served at once; more are refused with a failure reply.
MAX_CLIENTS = 16
#: Bytes read per readiness event (one recv, so one client cannot hog a loop turn).
RECV_SIZE = 64 * 1024

Reply = dict[str, Any]


class ControlError(Exception):
    """A control request failed; the message is the reply's ``error``."""


class RequestError(ControlError):
    """The request line is not a JSON object with a string "cmd"."""


class CommandError(ControlError):
    """A command refused its request (raised by handlers)."""


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any]  # the whole request object, "cmd" included


#: A command: request -> the reply's result keys (``ok`` is added), or raises CommandError.
Handler = Callable[["ControlServer", Request], Reply]


def parse_request(line: bytes) -> Request:
    """One request line (without its newline) -> Request; RequestError says what is wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise RequestError("empty request")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"request is not JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # a number past int()'s digit limit
        raise RequestError(f"request is not JSON ({exc})") from None
    except RecursionError:
        raise RequestError("request is not JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise RequestError(f"request must be a JSON object, not {_json_type(obj)}")
    if "cmd" not in obj:
        raise RequestError('request has no "cmd"')
    cmd = obj["cmd"]
    if not isinstance(cmd, str):
        raise RequestError(f'"cmd" must be a string, not {_json_type(cmd)}')
    return Request(cmd, obj)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def device_commands(*, stats: Callable[[], dict[str, Any]], stop: Callable[[], None],
                    dump_queue: Callable[[int], dict[str, Any]] | None = None,
                    link: Callable[[bool], bool] | None = None,
                    misbehave: Callable[[Misbehaviour], None] | None = None,
                    announce: Callable[[], int] | None = None,
                    ) -> dict[str, Handler]:
    """The command table of the device process: name -> handler. Add new commands here.

    ``dump_queue(index)`` decodes one virtqueue (``VirtioNetDevice.dump_queue``) and raises
    LookupError for a queue that does not exist or is not enabled; without it there is no
    ``dump-queue`` command. ``link(up)`` sets the link state and says whether it changed
    (``VirtioNetDevice.set_link``); without it there is no ``link`` command. ``announce()``
    requests an announcement and returns how many so far, ValueError when it cannot
    (``VirtioNetDevice.announce``); without it there is no ``announce`` command.
    """

    def ping(_server: ControlServer, _request: Request) -> Reply:
        return {}

    def do_stats(server: ControlServer, _request: Request) -> Reply:
        return {"stats": stats(), "control": server.counters()}

    def do_quit(_server: ControlServer, _request: Request) -> Reply:
        stop()
        return {}

    table: dict[str, Handler] = {"ping": ping, "stats": do_stats, "quit": do_quit}
    if dump_queue is not None:
        dump = dump_queue

        def do_dump_queue(_server: ControlServer, request: Request) -> Reply:
            if "queue" not in request.args:
                raise CommandError('dump-queue needs "queue": a queue index')
            queue = request.args["queue"]
            if isinstance(queue, bool) or not isinstance(queue, int):
                raise CommandError(f'"queue" must be an integer, not {_json_type(queue)}')
            try:
                return {"dump": dump(queue)}
            except LookupError as exc:
                raise CommandError(str(exc)) from None

        table["dump-queue"] = do_dump_queue
    if link is not None:
        set_link = link

        def do_link(_server: ControlServer, request: Request) -> Reply:
            if "up" not in request.args:
                raise CommandError('link needs "up": true or false')
            up = request.args["up"]
            if not isinstance(up, bool):
                raise CommandError(f'"up" must be a boolean, not {_json_type(up)}')
            changed = set_link(up)
            return {"up": up, "changed": changed}

        table["link"] = do_link
    if misbehave is not None:
        switch_on = misbehave

        def do_misbehave(_server: ControlServer, request: Request) -> Reply:
            args = request.args
            case = args.get("case")
            if not isinstance(case, str):
                raise CommandError(f'misbehave needs "case": a string, not {_json_type(case)}')
            after = args.get("after", 0)
            if isinstance(after, bool) or not isinstance(after, int):
                raise CommandError(f'"after" must be an integer, not {_json_type(after)}')
            queue = args.get("queue", "any")
            if not isinstance(queue, str):
                raise CommandError(f'"queue" must be a string, not {_json_type(queue)}')
            always = args.get("always", False)
            if not isinstance(always, bool):
                raise CommandError(f'"always" must be a boolean, not {_json_type(always)}')
            try:
                spec = Misbehaviour(case, after, queue, always)
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            switch_on(spec)
            return {"misbehave": str(spec)}

        table["misbehave"] = do_misbehave
    if announce is not None:
        ask = announce

        def do_announce(_server: ControlServer, _request: Request) -> Reply:
            try:
                return {"announces": ask()}
            except ValueError as exc:
                raise CommandError(str(exc)) from None

        table["announce"] = do_announce
    return table


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    name: str
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    writing: bool = False  # registered for EVENT_WRITE too
    open: bool = True


class ControlServer:
    """Serves the control protocol on a listening unix socket, inside the caller's selector."""

    def __init__(self, listener: socket.socket, commands: Mapping[str, Handler], *,
                 path: Path | None = None, max_line: int = MAX_LINE,
                 max_pending_output: int = MAX_PENDING_OUTPUT,
                 max_clients: int = MAX_CLIENTS) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.commands = dict(commands)
        self.path = path  # removed at close() when set
        self.max_line = max_line
        self.max_pending_output = max_pending_output
        self.max_clients = max_clients
        self.requests = 0
        self.errors = 0
        self.dropped = 0
        self.last_error = ""
        self._clients: set[_Client] = set()
        self._selector: selectors.BaseSelector | None = None
        self._accepted = 0

    @classmethod
    def listen(cls, path: Path, commands: Mapping[str, Handler], **limits: int) -> ControlServer:
        """Bind ``path`` (replacing a stale socket file) and listen on it."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(8)
        except OSError:
            sock.close()
            raise
        return cls(sock, commands, path=path, **limits)

    def register(self, selector: selectors.BaseSelector) -> None:
        """Start serving: accept and answer clients whenever ``selector`` reports them ready."""
        self._selector = selector
        selector.register(self.listener, selectors.EVENT_READ, self._on_accept)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def counters(self) -> dict[str, int | str]:
        return {"clients": len(self._clients), "requests": self.requests,
                "errors": self.errors, "dropped": self.dropped, "last_error": self.last_error}

    def close(self) -> None:
        """Flush what each client can take right now, close everything, remove the socket."""
        log.info("control: %d requests, %d errors, %d clients dropped",
                 self.requests, self.errors, self.dropped)
        for client in list(self._clients):
            self._close(client, flush=True)
        self._unregister(self.listener)
        self.listener.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    # -- events ------------------------------------------------------------------------------

    def _on_accept(self, _mask: int) -> None:
        # Level-triggered: whatever is left in the backlog makes the next select() return.
        for _ in range(self.max_clients):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: refuse, keep serving the rest
                self._error(f"accept failed: {exc}")
                return
            sock.setblocking(False)
            self._accepted += 1
            client = _Client(sock, f"control client {self._accepted}")
            if len(self._clients) >= self.max_clients:
                self._error(f"{client.name}: refused, already {self.max_clients} clients")
                client.outbuf += _encode(_failure("too many control clients"))
                self._close(client, flush=True)
                continue
            self._clients.add(client)
            assert self._selector is not None
            self._selector.register(sock, selectors.EVENT_READ, partial(self._on_client, client))

    def _on_client(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(client)
        if client.open and mask & selectors.EVENT_READ:
            self._read(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._error(f"{client.name}: receive failed: {exc}")
            self._close(client, flush=False)
            return
        if not data:
            if client.inbuf:
                self._error(f"{client.name}: closed in the middle of a request")
            self._close(client, flush=True)
            return
        client.inbuf += data
        self._handle_lines(client)

    def _handle_lines(self, client: _Client) -> None:
        buf = client.inbuf
        start = 0
        while client.open:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line:
                self._too_long(client)
                return
            line = bytes(buf[start:end])
            start = end + 1
            self._queue(client, self._answer(line))
        del buf[:start]
        if client.open and len(buf) > self.max_line:
            self._too_long(client)
            return
        if client.open:
            self._flush(client)

    def _too_long(self, client: _Client) -> None:
        self._queue(client, self._fail(f"request line longer than {self.max_line} bytes"))
        client.inbuf.clear()
        if client.open:
            self._close(client, flush=True)

    # -- requests ----------------------------------------------------------------------------

    def _answer(self, line: bytes) -> Reply:
        """The reply to one request line; never raises."""
        self.requests += 1
        try:
            request = parse_request(line)
            handler = self.commands.get(request.cmd)
            if handler is None:
                known = ", ".join(sorted(self.commands))
                raise RequestError(f"unknown command {request.cmd!r} (known: {known})")
            result = handler(self, request)
        except ControlError as exc:
            return self._fail(str(exc))
        except Exception as exc:  # a bug in a handler must not take the device down
            log.debug("control command failed", exc_info=True)
            return self._fail(f"internal error: {type(exc).__name__}: {exc}")
        return {"ok": True, **result}

    def _fail(self, message: str) -> Reply:
        self._error(message)
        return _failure(message)

    def _error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.info("control: %s", message)

    # -- output ------------------------------------------------------------------------------

    def _queue(self, client: _Client, reply: Reply) -> None:
        if len(client.outbuf) > self.max_pending_output:
            self.dropped += 1
            self._error(f"{client.name}: dropped, {len(client.outbuf)} bytes of replies unread")
            self._close(client, flush=False)
            return
        try:
            data = _encode(reply)
        except (TypeError, ValueError) as exc:  # a handler returned something not JSON
            data = _encode(self._fail(f"internal error: reply not JSON: {exc}"))
        client.outbuf += data

    def _flush(self, client: _Client) -> None:
        """Send what the socket takes now; watch for writability while anything is left."""
        if client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:  # EPIPE, ECONNRESET: the client is gone
                self._error(f"{client.name}: send failed: {exc}")
                self._close(client, flush=False)
                return
            del client.outbuf[:sent]
        want_write = bool(client.outbuf)
        if want_write != client.writing and self._selector is not None:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self._selector.modify(client.sock, events, partial(self._on_client, client))
            client.writing = want_write

    def _close(self, client: _Client, *, flush: bool) -> None:
        if flush and client.outbuf:
            # One try, never a wait: replies the socket cannot take now are lost.
            with contextlib.suppress(OSError):
                client.sock.send(client.outbuf)
        client.open = False
        self._clients.discard(client)
        self._unregister(client.sock)
        client.sock.close()

    def _unregister(self, sock: socket.socket) -> None:
        if self._selector is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)


def _failure(message: str) -> Reply:
    return {"ok": False, "error": message}


def _encode(reply: Reply) -> bytes:
    return json.dumps(reply).encode() + b"\n"
