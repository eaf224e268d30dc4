"""A hostile vfio-user client: named malformed messages and sequences, to prove the server survives.

Each ``HostileCase`` opens its own connection, misbehaves in one named way and reports an
``Outcome``: how the server reacted (an error reply and its errno, a success reply, or closing
the connection) and what the connection was like afterwards (closed by the server, still usable
for a well-formed request, or hung up by the client itself). Every case closes its connection
before it returns, so the server can take the next client.

A case says what it expects (``HostileCase.expect``) and whether the server should count it as a
failed client (attach failures, clients dropped after a protocol failure) and how many error
replies it causes; harness tests compare that with the server's counters. ``CASES`` lists them
all, in a stable order; ``case_named`` finds one.

The messages are framed by harness.testing.vfu_client (its ``send`` can forge any header).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import mmap
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

from harness.testing.mockdriver import MockDriver, MockMemory
from harness.testing.vfu_client import (
    CONFIG_REGION_INDEX,
    DEVICE_INFO,
    DMA_MAP,
    DMA_READ,
    DMA_UNMAP,
    DMA_WRITE,
    FLAG_TYPE_REPLY,
    HEADER,
    IRQ_SET,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    MSIX_IRQ_INDEX,
    PROTOCOL_MINOR,
    REGION_ACCESS,
    VERSION,
    Command,
    ServerClosed,
    VfioUserClient,
    VfioUserError,
)
from harness.virtio.pci import VirtioPciDevice

#: How long a case waits for a reply or for the server to close the connection. The cases
#: that stall (``uses_timeout``) need it to exceed the server's --client-timeout (5 s by
#: default: run such a server with a shorter one, or pass run_case a longer timeout).
REPLY_TIMEOUT = 5.0
#: Guest-RAM-like memory for the cases that map some: IOVA and size (4 KiB aligned).
RAM_IOVA = 0x100000
RAM_SIZE = 1 << 20
#: The virtio-net device's BAR0 size and the vendor/device id at config offset 0.
BAR0_SIZE = 0x4000
VIRTIO_NET_IDS = b"\xf4\x1a\x41\x10"
#: libvfio-user's largest message (SERVER_MAX_MSG_SIZE: 1 MiB of data + two headers).
SERVER_MAX_MSG_SIZE = (1 << 20) + HEADER.size + REGION_ACCESS.size


class Reaction(enum.Enum):
    ERROR = "error reply"
    OK = "success reply"
    DISCONNECT = "server closed the connection"
    HUNG_UP = "client hung up first"


class After(enum.Enum):
    CLOSED = "closed"        # the server closed the connection
    USABLE = "usable"        # a well-formed request on it still worked
    DESYNCED = "desynced"    # a well-formed request on it got a reply to something else
    HUNG_UP = "hung up"      # the case ended by closing it itself


@dataclass(frozen=True)
class Outcome:
    reaction: Reaction
    errno: int = 0
    after: After = After.CLOSED
    detail: str = ""

    def __str__(self) -> str:
        err = f" {errno.errorcode.get(self.errno, self.errno)}" if self.errno else ""
        return f"{self.reaction.value}{err}, then {self.after.value}" + (
            f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Expect:
    reaction: Reaction
    errno: int = 0
    after: After = After.CLOSED

    def matches(self, got: Outcome) -> bool:
        return (got.reaction, got.errno, got.after) == (self.reaction, self.errno, self.after)


@dataclass(frozen=True)
class HostileCase:
    name: str
    doc: str
    act: Callable[[HostileClient], Outcome]
    expect: Expect
    #: The server counts this client as failed (attach failure or dropped after a failure).
    client_failure: bool
    #: Error replies the server sends for it, exactly (None: not deterministic).
    error_replies: int | None
    #: The case waits for the server's client timeout.
    uses_timeout: bool = False


class HostileClient(VfioUserClient):
    """A VfioUserClient with the probes a hostile case needs; always has a timeout."""

    def __init__(self, path: str, *, timeout: float = REPLY_TIMEOUT) -> None:
        super().__init__(path, timeout=timeout)

    @property
    def sock(self) -> socket.socket:
        return self._conn()

    def negotiate(self) -> None:
        """A well-formed VERSION exchange on an open() connection."""
        caps = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}}
        payload = VERSION.pack(0, PROTOCOL_MINOR) + json.dumps(caps).encode() + b"\0"
        self.request(Command.VERSION, payload)

    def outcome_of(self, msg_id: int, cmd: int, *, attach: bool = False) -> Outcome:
        """Wait for the reply to (msg_id, cmd); then see whether the connection lives on.

        ``attach``: the message was the client's first (VERSION negotiation), so after any
        reply but success the server must close the connection.
        """
        try:
            self.recv_reply(msg_id, cmd)
        except ServerClosed as exc:
            return Outcome(Reaction.DISCONNECT, detail=str(exc))
        except VfioUserError as exc:
            if exc.errno == errno.ETIMEDOUT:
                raise
            after = self.closed_by_server() if attach else self.still_usable()
            return Outcome(Reaction.ERROR, exc.errno or 0, after)
        return Outcome(Reaction.OK, after=self.still_usable())

    def closed_by_server(self) -> After:
        """Wait for EOF; the server must close the connection (anything else is an error)."""
        if self.wait_closed():
            return After.CLOSED
        raise AssertionError("the server kept a connection it should have closed")

    def wait_closed(self, timeout: float | None = None) -> bool:
        """True once the server closed the connection (unread replies are discarded)."""
        sock = self.sock
        deadline = time.monotonic() + ((self.timeout or REPLY_TIMEOUT) if timeout is None
                                       else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                continue
            try:
                data = sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not data:
                return True

    def still_usable(self) -> After:
        """A well-formed request on the same connection must still work."""
        try:
            info = self.device_info()
        except ServerClosed:
            return After.CLOSED
        except VfioUserError as exc:
            if exc.errno == errno.EPROTO:
                return After.DESYNCED
            raise
        if info.num_regions < 8:
            raise AssertionError(f"device info after the case looks wrong: {info}")
        return After.USABLE

    def wait_hangup(self) -> bool:
        """True once the server shut the connection down, without reading anything."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLHUP)
        return bool(poller.poll((self.timeout or REPLY_TIMEOUT) * 1000))

    def disconnected(self) -> Outcome:
        """The case expects the server to close the connection (no reply)."""
        if self.wait_closed():
            return Outcome(Reaction.DISCONNECT)
        raise AssertionError("the server neither replied nor closed the connection")


@contextlib.contextmanager
def memfd(size: int = RAM_SIZE) -> Iterator[int]:
    fd = os.memfd_create("hostile-ram")
    try:
        os.ftruncate(fd, size)
        yield fd
    finally:
        os.close(fd)


def dma_map_msg(iova: int, size: int, *, flags: int = DMA_READ | DMA_WRITE, offset: int = 0,
                argsz: int = DMA_MAP.size) -> bytes:
    return DMA_MAP.pack(argsz, flags, offset, iova, size)


def _send(c: HostileClient, cmd: int, payload: bytes = b"", fds: tuple[int, ...] = (), *,
          size: int | None = None, flags: int = 0) -> Outcome:
    """Send one (malformed) message after a normal negotiation; the outcome of its reply."""
    msg_id = c.send(cmd, payload, fds, size=size, flags=flags)
    return c.outcome_of(msg_id, cmd)


CASES: list[HostileCase] = []


CaseFn = Callable[["HostileClient"], Outcome]


def case(
    expect: Expect, *, client_failure: bool = False, error_replies: int | None = None,
    uses_timeout: bool = False, negotiate: bool = True,
) -> Callable[[CaseFn], CaseFn]:  # fmt: skip
    """Register a case named after the function; its docstring says what it does. With
    ``negotiate`` the connection has done a well-formed VERSION exchange first."""

    def register(fn: CaseFn) -> CaseFn:
        def act(c: HostileClient) -> Outcome:
            c.open()
            try:
                if negotiate:
                    c.negotiate()
                return fn(c)
            finally:
                c.close()

        CASES.append(HostileCase(fn.__name__, (fn.__doc__ or "").strip(), act, expect,
                                 client_failure, error_replies, uses_timeout))
        return fn

    return register


def case_named(name: str) -> HostileCase:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


def run_case(path: str, hostile: HostileCase, *, timeout: float = REPLY_TIMEOUT) -> Outcome:
    return hostile.act(HostileClient(path, timeout=timeout))


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


def _version(c: HostileClient, payload: bytes) -> Outcome:
    msg_id = c.send(Command.VERSION, payload)
    return c.outcome_of(msg_id, Command.VERSION, attach=True)


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


# -- DMA_MAP / DMA_UNMAP -----------------------------------------------------------------------


@case(OK_USABLE, error_replies=0)
def dma_map_without_fd(c: HostileClient) -> Outcome:
    """A DMA_MAP without an fd (memory the device cannot touch, like a ROM window)."""
    out = _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, RAM_SIZE))
    c.dma_unmap(RAM_IOVA, RAM_SIZE)
    return out


@case(Expect(Reaction.ERROR, errno.ENOSPC, After.USABLE), error_replies=1)
def dma_map_huge_size(c: HostileClient) -> Outcome:
    """A DMA_MAP of 2^62 bytes without an fd."""
    return _send(c, Command.DMA_MAP, dma_map_msg(1 << 40, 1 << 62))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_past_end_of_file(c: HostileClient) -> Outcome:
    """A DMA_MAP of 1 TiB backed by a 1 MiB memfd (touching the rest would be SIGBUS)."""
    with memfd() as fd:
        return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 1 << 40), (fd,))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_wrapping(c: HostileClient) -> Outcome:
    """A DMA_MAP of [2^64 - 4 KiB, 2^64 + 4 KiB): its end wraps past 2^64."""
    return _send(c, Command.DMA_MAP, dma_map_msg((1 << 64) - 0x1000, 0x2000))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_unaligned(c: HostileClient) -> Outcome:
    """A DMA_MAP at IOVA 0x100010 of 0x1000 bytes (not page aligned)."""
    return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA + 0x10, 0x1000))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_size_zero(c: HostileClient) -> Outcome:
    """A DMA_MAP of 0 bytes."""
    return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 0))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_bad_flags(c: HostileClient) -> Outcome:
    """A DMA_MAP with an unknown flag bit."""
    return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 0x1000, flags=DMA_READ | 0x80))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_short_argsz(c: HostileClient) -> Outcome:
    """A DMA_MAP whose argsz is smaller than the structure."""
    return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 0x1000, argsz=8))


@case(Expect(Reaction.ERROR, errno.EACCES, After.USABLE), error_replies=1)
def dma_map_unmappable_fd(c: HostileClient) -> Outcome:
    """A DMA_MAP backed by the read end of a pipe (mmap refuses it)."""
    r, w = os.pipe()
    try:
        return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 0x1000), (r,))
    finally:
        os.close(r)
        os.close(w)


@case(EINVAL_USABLE, error_replies=1)
def dma_map_overlapping_live_map(c: HostileClient) -> Outcome:
    """A DMA_MAP overlapping half of a live one."""
    with memfd() as fd:
        c.dma_map(RAM_IOVA, RAM_SIZE, fd=fd)
        out = _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA + RAM_SIZE // 2, RAM_SIZE))
        c.dma_unmap(RAM_IOVA, RAM_SIZE)
        return out


@case(OK_USABLE, error_replies=0)
def dma_map_same_region_twice(c: HostileClient) -> Outcome:
    """The same DMA_MAP twice (the library takes it as the region it has)."""
    with memfd() as fd:
        c.dma_map(RAM_IOVA, RAM_SIZE, fd=fd)
        out = _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, RAM_SIZE), (fd,))
        c.dma_unmap(RAM_IOVA, RAM_SIZE)
        return out


@case(OK_USABLE, error_replies=0)
def dma_unmap_unknown_range(c: HostileClient) -> Outcome:
    """A DMA_UNMAP of a range nothing is mapped in (range semantics: nothing to do)."""
    return _send(c, Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, 0, 0x7000_0000, 0x10000))


@case(EINVAL_USABLE, error_replies=1)
def dma_unmap_splitting_a_region(c: HostileClient) -> Outcome:
    """A DMA_UNMAP of half of a live region."""
    with memfd() as fd:
        c.dma_map(RAM_IOVA, RAM_SIZE, fd=fd)
        out = _send(c, Command.DMA_UNMAP,
                    DMA_UNMAP.pack(DMA_UNMAP.size, 0, RAM_IOVA, RAM_SIZE // 2))
        c.dma_unmap(RAM_IOVA, RAM_SIZE)
        return out


@case(EINVAL_USABLE, error_replies=1)
def dma_unmap_wrapping(c: HostileClient) -> Outcome:
    """A DMA_UNMAP whose range wraps past 2^64."""
    return _send(c, Command.DMA_UNMAP,
                 DMA_UNMAP.pack(DMA_UNMAP.size, 0, (1 << 64) - 0x1000, 0x2000))


# -- REGION_READ / REGION_WRITE ----------------------------------------------------------------


@case(EINVAL_USABLE, error_replies=1)
def region_read_unknown_region(c: HostileClient) -> Outcome:
    """A REGION_READ of region 42."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, 42, 4))


@case(EINVAL_USABLE, error_replies=1)
def region_read_out_of_bounds(c: HostileClient) -> Outcome:
    """A REGION_READ of 4 bytes at BAR0's size - 2."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(BAR0_SIZE - 2, 0, 4))


@case(EINVAL_USABLE, error_replies=1)
def region_read_offset_wraps(c: HostileClient) -> Outcome:
    """A REGION_READ of 8 bytes at offset 2^64 - 4 (offset + count wraps)."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack((1 << 64) - 4, 0, 8))


@case(EINVAL_USABLE, error_replies=1)
def region_read_count_too_large(c: HostileClient) -> Outcome:
    """A REGION_READ of 2 MiB of config space."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, CONFIG_REGION_INDEX, 2 << 20))


@case(EINVAL_USABLE, error_replies=1)
def region_write_count_mismatch(c: HostileClient) -> Outcome:
    """A REGION_WRITE claiming 8 bytes and carrying 2."""
    return _send(c, Command.REGION_WRITE, REGION_ACCESS.pack(0x14, 0, 8) + b"\0\0")


@case(EINVAL_USABLE, error_replies=1)
def region_write_unknown_region(c: HostileClient) -> Outcome:
    """A REGION_WRITE to region 9 (past the last one)."""
    return _send(c, Command.REGION_WRITE, REGION_ACCESS.pack(0, 9, 4) + bytes(4))


@case(OK_USABLE, error_replies=0)
def bar0_access_of_odd_width(c: HostileClient) -> Outcome:
    """A 3-byte BAR0 read inside the common config (the device answers zeros and counts it)."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0x14, 0, 3))


# -- SET_IRQS ----------------------------------------------------------------------------------


def _irq_set(index: int, start: int, count: int, flags: int, data: bytes = b"") -> bytes:
    return IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count) + data


TRIGGER_EVENTFD = IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD
TRIGGER_NONE = IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_bad_index(c: HostileClient) -> Outcome:
    """SET_IRQS for IRQ index 9 (there are 5)."""
    return _send(c, Command.DEVICE_SET_IRQS, _irq_set(9, 0, 1, TRIGGER_NONE))


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_start_past_end(c: HostileClient) -> Outcome:
    """SET_IRQS for MSI-X vectors [99, 100)."""
    return _send(c, Command.DEVICE_SET_IRQS, _irq_set(MSIX_IRQ_INDEX, 99, 1, TRIGGER_NONE))


@case(OK_USABLE, error_replies=0)
def set_irqs_count_wraps(c: HostileClient) -> Outcome:
    """SET_IRQS for MSI-X vectors [1, 1 + 0xffffffff): start + count wraps to 0, which the
    library's bound check lets through as an empty range."""
    return _send(c, Command.DEVICE_SET_IRQS,
                 _irq_set(MSIX_IRQ_INDEX, 1, 0xFFFFFFFF, TRIGGER_NONE))


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_more_fds_than_count(c: HostileClient) -> Outcome:
    """SET_IRQS for one MSI-X vector carrying 3 eventfds."""
    fds = [os.eventfd(0) for _ in range(3)]
    try:
        return _send(c, Command.DEVICE_SET_IRQS,
                     _irq_set(MSIX_IRQ_INDEX, 0, 1, TRIGGER_EVENTFD), tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_too_many_fds(c: HostileClient) -> Outcome:
    """SET_IRQS for 200 MSI-X vectors (the device has 3) carrying 200 eventfds."""
    fds = [os.eventfd(0) for _ in range(200)]
    try:
        return _send(c, Command.DEVICE_SET_IRQS,
                     _irq_set(MSIX_IRQ_INDEX, 0, 200, TRIGGER_EVENTFD), tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_bool_data_short(c: HostileClient) -> Outcome:
    """SET_IRQS with DATA_BOOL for 3 vectors carrying 1 byte."""
    return _send(c, Command.DEVICE_SET_IRQS,
                 _irq_set(MSIX_IRQ_INDEX, 0, 3, IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL,
                          b"\x01"))


# -- sequences with live DMA -------------------------------------------------------------------


class RemoteBar0:
    """The device's BAR0 over vfio-user, shaped like VirtioPciDevice for MockDriver."""

    def __init__(self, client: VfioUserClient) -> None:
        self.client = client

    def bar0_read(self, offset: int, count: int) -> bytes:
        return self.client.region_read(0, offset, count)

    def bar0_write(self, offset: int, data: memoryview) -> None:
        self.client.region_write(0, offset, bytes(data))


class SharedMemory(MockMemory):
    """MockMemory whose bytes are a memfd the server maps too (the guest RAM of these cases)."""

    def __init__(self, fd: int, size: int = RAM_SIZE, base: int = RAM_IOVA) -> None:
        super().__init__(size, base=base)
        self.map = mmap.mmap(fd, size)
        self.buf = cast(bytearray, self.map)  # MockMemory only slices it

    def close(self) -> None:
        self.map.close()


def _live_driver(c: HostileClient, fd: int) -> tuple[MockDriver, SharedMemory]:
    """Map the memfd, then probe the device like Linux and post RX buffers and a TX frame."""
    c.dma_map(RAM_IOVA, RAM_SIZE, fd=fd)
    cmd = int.from_bytes(c.region_read(CONFIG_REGION_INDEX, 4, 2), "little")
    c.region_write(CONFIG_REGION_INDEX, 4, (cmd | 0x6).to_bytes(2, "little"))  # MEM + BME
    mem = SharedMemory(fd)
    driver = MockDriver(cast(VirtioPciDevice, RemoteBar0(c)), mem)
    driver.init()
    rx, tx = driver.queues[0], driver.queues[1]
    for _ in range(8):
        rx.add(in_=[2048])
    rx.kick()
    frame = bytes(12) + b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x06" + bytes(46)
    tx.add(out=[frame])
    tx.kick()
    return driver, mem


@case(OK_USABLE, error_replies=0)
def device_reset_mid_dma(c: HostileClient) -> Outcome:
    """Rings and buffers live in mapped memory, a TX frame just kicked: DEVICE_RESET, then the
    memory is unmapped."""
    with memfd() as fd:
        _, mem = _live_driver(c, fd)
        try:
            out = _send(c, Command.DEVICE_RESET)
            c.dma_unmap(RAM_IOVA, RAM_SIZE)
        finally:
            mem.close()
        return out


@case(OK_USABLE, error_replies=0)
def dma_unmap_under_live_rings(c: HostileClient) -> Outcome:
    """Rings live in mapped memory: DMA_UNMAP it, then kick TX (the device must not touch the
    memory that is gone)."""
    with memfd() as fd:
        driver, mem = _live_driver(c, fd)
        try:
            out = _send(c, Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, 0, RAM_IOVA,
                                                            RAM_SIZE))
            driver.queues[1].kick()
        finally:
            mem.close()
        return out


def well_behaved(path: str, *, timeout: float = REPLY_TIMEOUT) -> bytes:
    """What a good client gets: VERSION, then config space bytes 0..3 (vendor and device id)."""
    with VfioUserClient(path, timeout=timeout) as client:
        client.connect()
        return client.region_read(CONFIG_REGION_INDEX, 0, 4)
