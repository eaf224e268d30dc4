"""The control protocol: JSON requests over a unix stream socket (`stats`, `quit`)."""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def device_commands(*, stats: Callable[[], dict[str, Any]],
                    stop: Callable[[], None]) -> dict[str, Handler]:
    """The command table: name -> handler."""

    def do_stats(_request: dict[str, Any]) -> dict[str, Any]:
        return stats()

    def do_quit(_request: dict[str, Any]) -> dict[str, Any]:
        stop()
        return {"ok": True}

    return {"stats": do_stats, "quit": do_quit}


class ControlServer:
    """Answers one request per connection on a listening unix socket."""

    def __init__(self, listener: socket.socket, commands: Mapping[str, Handler],
                 path: Path | None = None) -> None:
        self.listener = listener
        self.commands = commands
        self.path = path

    @classmethod
    def listen(cls, path: Path, commands: Mapping[str, Handler]) -> ControlServer:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(4)
        sock.setblocking(False)
        return cls(sock, commands, path)

    def register(self, selector: selectors.BaseSelector) -> None:
        selector.register(self.listener, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self, _mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(2.0)
            try:
                line = conn.makefile("rb").readline()
                request = json.loads(line or b"{}")
                reply = self._control(request)
            except (OSError, ValueError) as exc:
                reply = {"error": str(exc)}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        handler = self.commands.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"error": f"unknown command {cmd!r}"}
        return handler(request)

    def close(self) -> None:
        self.listener.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
