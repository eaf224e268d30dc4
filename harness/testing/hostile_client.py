"""The hostile vfio-user client's machinery: a connection that misbehaves, and what it saw.

``HostileClient`` is a VfioUserClient with the probes a hostile case needs (the messages are
framed by harness.testing.vfu_client, whose ``send`` can forge any header). A ``HostileCase``
opens its own connection, misbehaves in one named way and reports an ``Outcome``: how the server
reacted (an error reply and its errno, a success reply, or closing the connection) and what the
connection was like afterwards (closed by the server, still usable for a well-formed request, or
hung up by the client itself). Every case closes its connection before it returns, so the server
can take the next client.

A case says what it expects (``HostileCase.expect``) and whether the server should count it as a
failed client (attach failures, clients dropped after a protocol failure) and how many error
replies it causes; harness tests compare that with the server's counters. ``CaseList.case``
registers a function as a case, ``run_case`` runs one, ``well_behaved`` is what a good client
gets after it.

The cases are in harness.testing.hostile_framing (message framing, attach) and
harness.testing.hostile_vfu (the rest); ``CASES``, the list of them all, is hostile_vfu's:
import it from there, where it is complete once that module has run (nothing here holds a list
of cases).
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
    DMA_MAP,
    DMA_READ,
    DMA_WRITE,
    HEADER,
    IRQ_SET,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
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


def _irq_set(index: int, start: int, count: int, flags: int, data: bytes = b"") -> bytes:
    return IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count) + data


TRIGGER_EVENTFD = IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD
TRIGGER_NONE = IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE


def _send(c: HostileClient, cmd: int, payload: bytes = b"", fds: tuple[int, ...] = (), *,
          size: int | None = None, flags: int = 0) -> Outcome:
    """Send one (malformed) message after a normal negotiation; the outcome of its reply."""
    msg_id = c.send(cmd, payload, fds, size=size, flags=flags)
    return c.outcome_of(msg_id, cmd)


def _version(c: HostileClient, payload: bytes) -> Outcome:
    msg_id = c.send(Command.VERSION, payload)
    return c.outcome_of(msg_id, Command.VERSION, attach=True)


CaseFn = Callable[["HostileClient"], Outcome]


class CaseList(list[HostileCase]):
    """Hostile cases in the order they were registered: ``case`` registers one, ``named`` finds
    one. harness.testing.hostile_vfu's ``CASES`` is the list of the named cases."""

    def case(
        self, expect: Expect, *, client_failure: bool = False, error_replies: int | None = None,
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

            self.append(HostileCase(fn.__name__, (fn.__doc__ or "").strip(), act, expect,
                                    client_failure, error_replies, uses_timeout))
            return fn

        return register

    def named(self, name: str) -> HostileCase:
        for c in self:
            if c.name == name:
                return c
        raise KeyError(name)


def run_case(path: str, hostile: HostileCase, *, timeout: float = REPLY_TIMEOUT) -> Outcome:
    return hostile.act(HostileClient(path, timeout=timeout))


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


def well_behaved(path: str, *, timeout: float = REPLY_TIMEOUT) -> bytes:
    """What a good client gets: VERSION, then config space bytes 0..3 (vendor and device id)."""
    with VfioUserClient(path, timeout=timeout) as client:
        client.connect()
        return client.region_read(CONFIG_REGION_INDEX, 0, 4)
