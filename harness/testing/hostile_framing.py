"""The hostile vfio-user cases of attach and message framing, and the list they start.

Defines ``CASES`` (with ``case``, which registers a case, and ``case_named``) and the usual
expectations (``ERROR_CLOSED``, ``EINVAL_USABLE``, ``OK_USABLE``, ``DISCONNECT``, ``HUNG_UP``),
then registers the first cases: a bad or missing VERSION during attach, and broken framing after
a good one (sizes, truncation, unknown commands, unread replies, stray fds).
harness.testing.hostile_vfu registers the rest; import ``CASES`` from there, where it is
complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket

from harness.testing.hostile_client import (
    RAM_IOVA,
    RAM_SIZE,
    SERVER_MAX_MSG_SIZE,
    After,
    CaseList,
    Expect,
    HostileClient,
    Outcome,
    Reaction,
    _send,
    _version,
    dma_map_msg,
)
from harness.testing.vfu_client import (
    CONFIG_REGION_INDEX,
    DEVICE_INFO,
    DMA_MAP,
    FLAG_TYPE_REPLY,
    HEADER,
    PROTOCOL_MINOR,
    REGION_ACCESS,
    VERSION,
    Command,
    ServerClosed,
)

#: Every case, in the order they are defined: these, then harness.testing.hostile_vfu's (complete
#: once that module has run).
CASES = CaseList()
case = CASES.case
case_named = CASES.named


ERROR_CLOSED = Expect(Reaction.ERROR, errno.EINVAL, After.CLOSED)
EINVAL_USABLE = Expect(Reaction.ERROR, errno.EINVAL, After.USABLE)
OK_USABLE = Expect(Reaction.OK, 0, After.USABLE)
DISCONNECT = Expect(Reaction.DISCONNECT, 0, After.CLOSED)
HUNG_UP = Expect(Reaction.HUNG_UP, 0, After.HUNG_UP)


# -- during attach (the first message must be a good VERSION) ----------------------------------


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False)
def garbage_instead_of_version(c: HostileClient) -> Outcome:
    """24 bytes of text where VERSION belongs (its "header" claims a reply flag)."""
    c.send(0, raw=b"garbage garbage garbage!")
    return c.disconnected()


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False)
def truncated_header_at_attach(c: HostileClient) -> Outcome:
    """Half a header (8 of 16 bytes), then silence."""
    c.send(0, raw=HEADER.pack(0, Command.VERSION, 64, 0, 0)[:8])
    return c.disconnected()


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def command_before_version(c: HostileClient) -> Outcome:
    """DEVICE_GET_INFO as the first message."""
    msg_id = c.send(Command.DEVICE_GET_INFO, bytes(16))
    return c.outcome_of(msg_id, Command.DEVICE_GET_INFO, attach=True)


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_bad_major(c: HostileClient) -> Outcome:
    """VERSION 1.0 (the server speaks 0.x)."""
    return _version(c, VERSION.pack(1, 0) + b"{}\0")


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_invalid_json(c: HostileClient) -> Outcome:
    """VERSION whose capabilities are not JSON."""
    return _version(c, VERSION.pack(0, PROTOCOL_MINOR) + b"{capabilities: [1, 2\0")


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_json_without_nul(c: HostileClient) -> Outcome:
    """VERSION whose JSON is not NUL-terminated (the server would read past it)."""
    return _version(c, VERSION.pack(0, PROTOCOL_MINOR) + b'{"capabilities": {}}')


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_huge_json(c: HostileClient) -> Outcome:
    """VERSION with 1 MiB of JSON nested 512 Ki levels deep (as large as a message may be)."""
    depth = (SERVER_MAX_MSG_SIZE - HEADER.size - VERSION.size - 1) // 2
    return _version(c, VERSION.pack(0, PROTOCOL_MINOR) + b"[" * depth + b"]" * depth + b"\0")


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_bad_capabilities(c: HostileClient) -> Outcome:
    """VERSION asking for 100000 fds per message (the server allows 1024)."""
    caps = json.dumps({"capabilities": {"max_msg_fds": 100000}}).encode()
    return _version(c, VERSION.pack(0, PROTOCOL_MINOR) + caps + b"\0")


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False)
def version_oversized(c: HostileClient) -> Outcome:
    """VERSION whose header claims 2 MiB (more than any message may be), body following."""
    payload = VERSION.pack(0, PROTOCOL_MINOR) + b" " * 4096
    with contextlib.suppress(ServerClosed):
        c.send(Command.VERSION, payload, size=2 << 20)
    return c.disconnected()


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False)
def version_size_ffffffff(c: HostileClient) -> Outcome:
    """VERSION whose header claims 0xffffffff bytes."""
    c.send(Command.VERSION, VERSION.pack(0, PROTOCOL_MINOR), size=0xFFFFFFFF)
    return c.disconnected()


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False, uses_timeout=True)
def version_never_sent(c: HostileClient) -> Outcome:
    """Connect and say nothing (the server must not wait for ever)."""
    return c.disconnected()


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False, uses_timeout=True)
def version_body_stalls(c: HostileClient) -> Outcome:
    """A VERSION header claiming 100 bytes of body, then 10 bytes and silence."""
    c.send(Command.VERSION, VERSION.pack(0, PROTOCOL_MINOR) + b"{}\0" + bytes(3),
           size=HEADER.size + 100)
    return c.disconnected()


# -- framing, after a good VERSION -------------------------------------------------------------


@case(DISCONNECT, error_replies=0)
def truncated_header(c: HostileClient) -> Outcome:
    """Half a header (8 of 16 bytes), then silence: the server reads it as a lost connection."""
    c.send(0, raw=HEADER.pack(7, Command.DEVICE_GET_INFO, 32, 0, 0)[:8])
    return c.disconnected()


@case(EINVAL_USABLE, error_replies=1)
def size_larger_than_message(c: HostileClient) -> Outcome:
    """A REGION_READ whose header claims 16 more bytes than it carries."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, CONFIG_REGION_INDEX, 4),
                 size=HEADER.size + REGION_ACCESS.size + 16)


@case(EINVAL_USABLE, error_replies=1)
def size_ffffffff(c: HostileClient) -> Outcome:
    """A REGION_READ header claiming 0xffffffff bytes, alone (the server reads no body for a
    size it refuses, so bytes after it would be taken for the next header)."""
    return _send(c, Command.REGION_READ, size=0xFFFFFFFF)


@case(EINVAL_USABLE, error_replies=1)
def size_smaller_than_header(c: HostileClient) -> Outcome:
    """A REGION_READ header claiming 8 bytes, less than itself (alone, as above)."""
    return _send(c, Command.REGION_READ, size=8)


@case(Expect(Reaction.ERROR, errno.EINVAL, After.DESYNCED), error_replies=2)
def body_read_as_next_header(c: HostileClient) -> Outcome:
    """A header claiming 0xffffffff bytes followed by a 16-byte body: the server refuses the
    header, then reads the body as a header (flags 7: not a command) and refuses that too, so
    the client's next request is answered out of turn. A client that lies about sizes
    desynchronises its own connection, and only its own."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, CONFIG_REGION_INDEX, 4),
                 size=0xFFFFFFFF)


@case(DISCONNECT, client_failure=True, error_replies=1, uses_timeout=True)
def body_never_sent(c: HostileClient) -> Outcome:
    """A REGION_WRITE header claiming 40 bytes of body, then silence."""
    c.send(Command.REGION_WRITE, size=HEADER.size + 40)
    try:
        c.recv_reply(0, Command.REGION_WRITE)
    except ServerClosed:
        return Outcome(Reaction.DISCONNECT)
    return c.disconnected()


@case(HUNG_UP, error_replies=None)
def disconnect_mid_message(c: HostileClient) -> Outcome:
    """A DMA_MAP header and half its body, then the client closes the connection."""
    c.send(Command.DMA_MAP, dma_map_msg(RAM_IOVA, RAM_SIZE)[:12],
           size=HEADER.size + DMA_MAP.size)
    c.sock.shutdown(socket.SHUT_RDWR)
    return Outcome(Reaction.HUNG_UP, after=After.HUNG_UP)


@case(EINVAL_USABLE, error_replies=1)
def unknown_command(c: HostileClient) -> Outcome:
    """Command 99 with a payload."""
    return _send(c, 99, bytes(16))


@case(EINVAL_USABLE, error_replies=1)
def reply_flag_on_a_request(c: HostileClient) -> Outcome:
    """A DEVICE_RESET (no body) flagged as a reply."""
    return _send(c, Command.DEVICE_RESET, flags=FLAG_TYPE_REPLY)


@case(EINVAL_USABLE, error_replies=1)
def second_version(c: HostileClient) -> Outcome:
    """VERSION again on a negotiated connection."""
    return _send(c, Command.VERSION, VERSION.pack(0, PROTOCOL_MINOR) + b"{}\0")


@case(DISCONNECT, client_failure=True, error_replies=0, uses_timeout=True)
def replies_never_read(c: HostileClient) -> Outcome:
    """DEVICE_GET_INFO requests until the socket is full, and never a reply read."""
    msg = HEADER.pack(0, Command.DEVICE_GET_INFO, HEADER.size + DEVICE_INFO.size, 0, 0)
    msg += DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0)
    c.sock.setblocking(False)
    with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
        while True:
            c.sock.send(msg * 256)
    c.sock.settimeout(c.timeout)
    if not c.wait_hangup():
        raise AssertionError("the server kept a client that reads no replies")
    return c.disconnected()


@case(OK_USABLE, error_replies=0)
def fds_on_a_request_that_takes_none(c: HostileClient) -> Outcome:
    """A config-space REGION_READ carrying 4 eventfds (the server must close them)."""
    fds = [os.eventfd(0) for _ in range(4)]
    try:
        return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, CONFIG_REGION_INDEX, 4),
                     tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)
