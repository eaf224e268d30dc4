"""A minimal in-process vfio-user client, so tests can drive a real server context without QEMU.

It speaks the wire protocol of libvfio-user's include/vfio-user.h and docs/vfio-user.rst:
VERSION negotiation (JSON capabilities), DEVICE_GET_INFO, GET_REGION_INFO, GET_IRQ_INFO,
REGION_READ/REGION_WRITE, DMA_MAP (fd passed with SCM_RIGHTS), DMA_UNMAP and DEVICE_RESET.

Server and client may share one thread: every request is sent, then `pump` (typically
"attach if not attached, else run()") is called until the reply is readable. Against a server
in another process, give a `timeout` instead: a reply that does not come raises ETIMEDOUT.

The framing is split (`send` any header/payload/fds, `recv_reply`) so that
harness.testing.hostile_vfu can send what a well-behaved client never would.
"""

from __future__ import annotations

import array
import enum
import errno as errno_mod
import json
import os
import select
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HEADER = struct.Struct("<HHIII")  # msg_id, cmd, msg_size (incl. header), flags, error_no
VERSION = struct.Struct("<HH")
DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
REGION_ACCESS = struct.Struct("<QII")  # offset, region, count
DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, addr, size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, addr, size
IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count (+ data)

FLAG_TYPE_REPLY = 1
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5
DMA_READ = 1 << 0
DMA_WRITE = 1 << 1
#: struct vfio_irq_set flags (linux/vfio.h).
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
MSIX_IRQ_INDEX = 2
CONFIG_REGION_INDEX = 7
#: vfio-user protocol version this client speaks (libvfio-user's LIB_VFIO_USER_MAJOR/MINOR).
PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 1
#: How many times to pump the server for one reply before declaring it lost.
MAX_PUMPS = 1000


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14


class VfioUserError(OSError):
    """The server replied with an error; .errno is its error_no."""


class ServerClosed(VfioUserError):
    """The server closed the connection (EOF, reset, or a broken pipe while sending)."""


@dataclass(frozen=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int


class VfioUserClient:
    """One client connection. Use connect(), then the request helpers; close() when done."""

    def __init__(
        self, path: str, pump: Callable[[], object] | None = None, *, timeout: float | None = None
    ) -> None:
        self.path = path
        self._pump = pump
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._next_id = 0
        self.server_version: tuple[int, int] = (0, 0)
        self.server_caps: dict[str, object] = {}

    # -- connection ----------------------------------------------------------------------

    def connect(self, *, max_msg_fds: int = 16, max_data_xfer_size: int = 1 << 20) -> None:
        """Connect and negotiate (the server's attach() reads VERSION, so it is sent first)."""
        self.open()
        caps = {
            "capabilities": {"max_msg_fds": max_msg_fds, "max_data_xfer_size": max_data_xfer_size}
        }
        payload = VERSION.pack(PROTOCOL_MAJOR, PROTOCOL_MINOR) + json.dumps(caps).encode() + b"\0"
        reply = self.request(Command.VERSION, payload)
        major, minor = VERSION.unpack_from(reply)
        self.server_version = (major, minor)
        text = reply[VERSION.size :].rstrip(b"\0")
        if text:
            self.server_caps = json.loads(text).get("capabilities", {})

    def open(self) -> None:
        """Just connect the socket (no VERSION: see connect())."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        reply = self.request(Command.DEVICE_GET_INFO, DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0))
        _, flags, nregions, nirqs = DEVICE_INFO.unpack_from(reply)
        return DeviceInfo(flags, nregions, nirqs)

    def region_info(self, index: int) -> RegionInfo:
        req = REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0)
        reply = self.request(Command.DEVICE_GET_REGION_INFO, req)
        _, flags, idx, _, size, offset = REGION_INFO.unpack_from(reply)
        return RegionInfo(idx, flags, size, offset)

    def irq_count(self, index: int) -> int:
        reply = self.request(Command.DEVICE_GET_IRQ_INFO, IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        count: int = IRQ_INFO.unpack_from(reply)[3]
        return count

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.request(Command.REGION_READ, REGION_ACCESS.pack(offset, region, count))
        _, _, got = REGION_ACCESS.unpack_from(reply)
        return reply[REGION_ACCESS.size : REGION_ACCESS.size + got]

    def region_write(self, region: int, offset: int, data: bytes) -> None:
        self.request(Command.REGION_WRITE, REGION_ACCESS.pack(offset, region, len(data)) + data)

    def dma_map(
        self, iova: int, size: int, *, fd: int | None = None, offset: int = 0, writable: bool = True
    ) -> None:
        flags = DMA_READ | (DMA_WRITE if writable else 0)
        req = DMA_MAP.pack(DMA_MAP.size, flags, offset, iova, size)
        self.request(Command.DMA_MAP, req, fds=[fd] if fd is not None else ())

    def dma_unmap(self, iova: int, size: int, *, flags: int = 0) -> None:
        self.request(Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, flags, iova, size))

    def set_irqs(
        self, index: int, start: int, count: int, flags: int, *, fds: Sequence[int] = (),
        data: bytes = b"",
    ) -> None:  # fmt: skip
        req = IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count) + data
        self.request(Command.DEVICE_SET_IRQS, req, fds=fds)

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET, b"")

    def request(self, cmd: int, payload: bytes, fds: Sequence[int] = ()) -> bytes:
        """Send one command and return the reply payload; VfioUserError if it failed."""
        msg_id = self.send(cmd, payload, fds)
        return self.recv_reply(msg_id, cmd)

    def send(
        self, cmd: int, payload: bytes = b"", fds: Sequence[int] = (), *,
        msg_id: int | None = None, size: int | None = None, flags: int = 0,
        raw: bytes | None = None,
    ) -> int:  # fmt: skip
        """Send one message, well-formed unless told otherwise; returns its msg_id.

        ``size`` overrides the header's msg_size, ``flags`` its flags word; ``raw`` replaces
        the whole message (header included) with exactly those bytes.
        """
        sock = self._conn()
        if msg_id is None:
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
        if size is None:
            size = HEADER.size + len(payload)
        parts = [raw] if raw is not None else [HEADER.pack(msg_id, cmd, size, flags, 0), payload]
        ancillary = []
        if fds:
            ancillary.append(
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
            )
        try:
            # sendmsg() may send part of a large message; the fds go with its first byte.
            sent = sock.sendmsg(parts, ancillary)
            rest = b"".join(parts)[sent:]
            if rest:
                sock.sendall(rest)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ServerClosed(exc.errno, f"sending {cmd}: {exc.strerror}") from None
        return msg_id

    def recv_reply(self, msg_id: int, cmd: int) -> bytes:
        """The reply to (msg_id, cmd): its payload, or VfioUserError with the server's errno."""
        self._wait_readable()
        rid, rcmd, size, flags, err = HEADER.unpack(self._recv_exact(HEADER.size))
        body = self._recv_exact(size - HEADER.size)
        if rid != msg_id or rcmd != cmd or not flags & FLAG_TYPE_REPLY:
            raise VfioUserError(
                errno_mod.EPROTO, f"unexpected reply id={rid} cmd={rcmd} flags={flags:#x}"
            )
        if flags & FLAG_ERROR:
            name = Command(cmd).name if cmd in Command._value2member_map_ else str(cmd)
            raise VfioUserError(err, f"{name}: {os.strerror(err)}")
        return body

    # -- socket plumbing -----------------------------------------------------------------

    def _conn(self) -> socket.socket:
        if self._sock is None:
            raise VfioUserError(errno_mod.ENOTCONN, "not connected")
        return self._sock

    def _wait_readable(self) -> None:
        sock = self._conn()
        if self._pump is None:
            return  # the server runs elsewhere: the blocking recv waits for it
        for _ in range(MAX_PUMPS):
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                return
            self._pump()
        raise VfioUserError(errno_mod.ETIMEDOUT, "no reply from the server")

    def _recv_exact(self, n: int) -> bytes:
        sock = self._conn()
        chunks = []
        while n:
            try:
                chunk = sock.recv(n)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise VfioUserError(errno_mod.ETIMEDOUT, "no reply from the server") from None
            if not chunk:
                raise ServerClosed(errno_mod.ECONNRESET, "server closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)
