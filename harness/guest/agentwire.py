"""The guest agent's wire protocol (harness.guest.agent is the client that speaks it): the
request encoders and the reply parser, pure functions without I/O.

Protocol (version 1). Both directions are lines of printable ASCII ending in "\\n", fields
separated by one space. Every payload (command, stdin, path, file data, output, error message)
is base64 (RFC 4648, padded, no line breaks), with "-" for empty, so output may hold any bytes.
IDs are 1 to 64 of `A-Za-z0-9._-`, chosen by the host, unique per connection. The host writes
an empty line before every request: whatever a previous client left half-sent is ended there
(and answered with an `err`), so framing always recovers; the agent ignores empty lines.

    host -> guest                                  guest -> host
    ping ID                                        pong ID
    run ID SECONDS B64CMD B64STDIN                 done ID STATUS TIMEDOUT B64STDOUT B64STDERR
    put ID B64PATH OFFSET B64DATA                  ok ID
    commit ID B64PATH MODE SIZE SHA256             ok ID
    (a request it cannot serve)                    err ID B64MESSAGE     (ID "-" if unreadable)
                                                   ready harness-agent VERSION   (unsolicited)

- `run`: `sh -c CMD` in its own session (setsid), stdin from STDIN or /dev/null, stdout and
  stderr to files, under busybox `timeout -s KILL SECONDS`. STATUS is the shell's `$?` (128+N
  for signal N). TIMEDOUT is 1 when the timeout killed it (STATUS 137 after at least SECONDS);
  then the rest of its process group is killed too. Commands that finish leave their
  background children running.
- `put` writes DATA at OFFSET of `PATH.agent-part` (OFFSET 0 creates it and PATH's directory;
  any other OFFSET must equal the part's size, so a lost chunk is an error, not a hole);
  `commit` checks SIZE and SHA256, chmods MODE (octal) and renames the part to PATH.
- `ready` is written each time the agent (re)opens the port: at boot, and after a guest reboot.
  A host that connects later never sees it, so readiness is established with `ping`.
- One request at a time: the host sends the next request only after the reply to the last.
  Request lines are at most MAX_REQUEST bytes (the guest tty's buffers take them whole while
  the shell reads them byte by byte); larger files go in several `put`s of CHUNK bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

#: The protocol version this module speaks (the agent's `ready` line carries its own).
VERSION = "1"
#: The longest request line the host sends (the guest reads it byte by byte from the tty).
MAX_REQUEST = 48 * 1024
#: Bytes of file data per `put` request (base64: 4/3 of it, within MAX_REQUEST).
CHUNK = 32 * 1024

_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# -- framing: pure functions -------------------------------------------------------------------


def b64(data: bytes) -> str:
    """A payload field: base64, or "-" for no bytes."""
    return base64.b64encode(data).decode("ascii") if data else "-"


def unb64(field: str) -> bytes:
    """The bytes of a payload field; ValueError if it is not strict base64 or "-"."""
    if field == "-":
        return b""
    try:
        return base64.b64decode(field, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {field[:40]!r}: {exc}") from None


def _line(*fields: str) -> bytes:
    if not _ID.match(fields[1]):
        raise ValueError(f"bad request id {fields[1]!r}")
    return " ".join(fields).encode("ascii") + b"\n"


def encode_ping(req_id: str) -> bytes:
    return _line("ping", req_id)


def encode_run(req_id: str, cmd: str, seconds: int, stdin: bytes | None = None) -> bytes:
    """A `run` request; ValueError if it would exceed MAX_REQUEST (put big inputs as files)."""
    if seconds < 1:
        raise ValueError("the guest timeout is whole seconds >= 1")
    line = _line("run", req_id, str(seconds), b64(cmd.encode()), b64(stdin or b""))
    if len(line) > MAX_REQUEST:
        raise ValueError(f"the command and its stdin take {len(line)} bytes encoded, more than "
                         f"{MAX_REQUEST}: put the input in a file (GuestAgent.put) instead")
    return line


def _check_path(path: str) -> None:
    if not path.startswith("/") or "\n" in path or "\0" in path:
        raise ValueError(f"a guest path must be absolute, without newline or NUL: {path!r}")


def encode_put(req_id: str, path: str, offset: int, chunk: bytes) -> bytes:
    _check_path(path)
    if offset < 0 or len(chunk) > CHUNK:
        raise ValueError("put: offset >= 0 and at most CHUNK bytes")
    return _line("put", req_id, b64(path.encode()), str(offset), b64(chunk))


def encode_commit(req_id: str, path: str, mode: int, size: int, sha256: str) -> bytes:
    _check_path(path)
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode:#o} is not a permission mode")
    return _line("commit", req_id, b64(path.encode()), f"{mode:04o}", str(size), sha256)


@dataclass(frozen=True)
class Ready:
    """The agent (re)opened its port."""

    version: str


@dataclass(frozen=True)
class Pong:
    id: str


@dataclass(frozen=True)
class Ok:
    id: str


@dataclass(frozen=True)
class Err:
    id: str
    message: str


@dataclass(frozen=True)
class Done:
    id: str
    returncode: int
    timed_out: bool
    stdout: bytes
    stderr: bytes


Reply = Ready | Pong | Ok | Err | Done


def parse_reply(line: bytes) -> Reply | None:
    """One line from the agent (without its newline); None if it is not a well-formed reply."""
    try:
        fields = line.decode("ascii").strip().split(" ")
    except UnicodeDecodeError:
        return None
    kind, n = fields[0], len(fields)
    try:
        if kind == "ready" and n == 3 and fields[1] == "harness-agent":
            return Ready(fields[2])
        if n < 2 or not (fields[1] == "-" or _ID.match(fields[1])):
            return None
        if kind == "pong" and n == 2:
            return Pong(fields[1])
        if kind == "ok" and n == 2:
            return Ok(fields[1])
        if kind == "err" and n == 3:
            return Err(fields[1], unb64(fields[2]).decode(errors="replace"))
        if kind == "done" and n == 6 and fields[3] in ("0", "1"):
            return Done(fields[1], int(fields[2]), fields[3] == "1", unb64(fields[4]),
                        unb64(fields[5]))
    except ValueError:
        return None
    return None
