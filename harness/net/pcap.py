"""Packet capture: the frames the device moves between guest and TAP, written as one pcapng file.

Both directions go into one file with one interface (``virtio-net0``, LINKTYPE_ETHERNET), and
each Enhanced Packet Block carries ``epb_flags`` with the direction as seen from the guest:
inbound = host -> guest (frames the device delivered to the guest's RX queue), outbound =
guest -> host (frames the guest transmitted). The 12-byte ``virtio_net_hdr_v1`` in front of
every frame is stripped, so any pcapng reader sees plain Ethernet; offload frames (GSO up to
64 KiB and more) are kept whole (snaplen 0 = no limit). Timestamps are ``time.time_ns()`` with
``if_tsresol`` = nanoseconds.

``CapturingBackend`` wraps a ``PacketBackend``; the server only puts it in the device's path
when ``--pcap`` is given, so an uncaptured run pays nothing.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Generic, TypeVar

from harness.virtio.protocols import PacketBackend

log = logging.getLogger(__name__)

#: virtio_net_hdr_v1 as the TAP (TUNSETVNETHDRSZ=12) and the device exchange it.
VNET_HDR_LEN = 12
LINKTYPE_ETHERNET = 1
#: No limit: a GSO frame is 64 KiB + headers, and a truncated capture hides exactly those bugs.
SNAPLEN = 0
IF_NAME = "virtio-net0"
#: Flush the file buffer at most this often (seconds, checked when a frame is written); there
#: is no fsync: the capture is for reading after (or, a second late, during) the run.
FLUSH_INTERVAL = 1.0
BUFFER_SIZE = 256 * 1024

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_ENDOFOPT = 0
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_TSRESOL = 9
_EPB_FLAGS = 2
_TSRESOL_NS = 9  # 10^-9 s
# Block type, total length, interface id, timestamp high/low, captured and original length.
_EPB_HEAD = struct.Struct("<IIIIIII")


class Direction(enum.IntEnum):
    """``epb_flags`` bits 0-1, from the guest's side of the link."""

    INBOUND = 1   # host -> guest: delivered to the guest's RX queue
    OUTBOUND = 2  # guest -> host: transmitted by the guest


def _option(code: int, value: bytes) -> bytes:
    pad = -len(value) % 4
    return struct.pack("<HH", code, len(value)) + value + b"\0" * pad


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def _end_of_options() -> bytes:
    return struct.pack("<HH", _OPT_ENDOFOPT, 0)


class PcapngWriter:
    """Writes one pcapng section with one Ethernet interface; ``write`` appends one frame.

    Not thread-safe; ``write`` after ``close`` raises ValueError.
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        if_name: str = IF_NAME,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._file = file
        self._clock = clock
        self._monotonic = monotonic
        self._flush_interval = flush_interval
        self._last_flush = monotonic()
        self.frames = 0
        self.bytes = 0
        # The options part of every EPB is the same for a direction: build it once.
        self._epb_tail = {
            d: _option(_EPB_FLAGS, struct.pack("<I", int(d))) + _end_of_options()
            for d in Direction
        }
        shb = struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1)  # length -1: not known
        shb += _option(_SHB_USERAPPL, b"harness") + _end_of_options()
        idb = struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAPLEN)
        idb += (_option(_IF_NAME, if_name.encode()) + _option(_IF_TSRESOL, bytes([_TSRESOL_NS]))
                + _end_of_options())
        file.write(_block(_SHB, shb) + _block(_IDB, idb))

    @classmethod
    def open(cls, path: Path, *, if_name: str = IF_NAME) -> PcapngWriter:
        """Create (or truncate) ``path`` and write the section and interface headers."""
        f = open(path, "wb", buffering=BUFFER_SIZE)  # noqa: SIM115 (owned by the writer)
        try:
            return cls(f, if_name=if_name)
        except BaseException:
            f.close()
            raise

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, frame_views: Sequence[memoryview], direction: Direction) -> None:
        """Append one Ethernet frame, gathered from ``frame_views`` (copied before returning)."""
        if self._file.closed:
            raise ValueError("pcapng writer is closed")
        length = sum(v.nbytes for v in frame_views)
        pad = -length % 4
        tail = self._epb_tail[direction]
        total = _EPB_HEAD.size + length + pad + len(tail) + 4
        ts = self._clock()
        f = self._file
        f.write(_EPB_HEAD.pack(_EPB, total, 0, (ts >> 32) & 0xFFFFFFFF, ts & 0xFFFFFFFF,
                               length, length))
        for v in frame_views:
            f.write(v)
        f.write(b"\0" * pad + tail + struct.pack("<I", total))
        self.frames += 1
        self.bytes += length
        now = self._monotonic()
        if now - self._last_flush >= self._flush_interval:
            f.flush()
            self._last_flush = now

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = self._monotonic()

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> PcapngWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def ethernet_views(views: Sequence[memoryview], length: int) -> list[memoryview]:
    """The Ethernet frame inside the first ``length`` bytes of ``views`` (byte views): without
    the vnet header, which may end anywhere (inside a view, or spanning several)."""
    out: list[memoryview] = []
    pos = 0  # offset of the current view within the vnet frame
    for v in views:
        if pos >= length:
            break
        n = v.nbytes
        start = max(VNET_HDR_LEN - pos, 0)
        end = min(n, length - pos)
        if start < end:
            out.append(v[start:end])
        pos += n
    return out


B = TypeVar("B", bound=PacketBackend)


class CapturingBackend(Generic[B]):
    """A PacketBackend that records every frame passing through ``inner`` to a pcapng writer.

    Inbound: a frame ``readv`` returned (``length`` >= the vnet header: shorter ones are runts
    the device drops). Outbound: every frame handed to ``writev``, recorded before ``inner``
    sees it, so a frame the TAP refuses (malformed header, queue full) is still in the capture:
    it is what the guest transmitted. A failing capture file (disk full) is logged once and
    capture stops; traffic is never affected.
    """

    def __init__(self, inner: B, writer: PcapngWriter) -> None:
        self.inner = inner
        self.writer = writer
        #: The capture's first write error; once set nothing more is recorded.
        self.error: str | None = None

    def fileno(self) -> int:
        return self.inner.fileno()

    def readv(self, views: Sequence[memoryview]) -> int:
        got = self.inner.readv(views)
        if got >= VNET_HDR_LEN:
            self._record(views, got, Direction.INBOUND)
        return got

    def writev(self, views: Sequence[memoryview]) -> None:
        length = sum(v.nbytes for v in views)
        if length >= VNET_HDR_LEN:
            self._record(views, length, Direction.OUTBOUND)
        self.inner.writev(views)

    def _record(self, views: Sequence[memoryview], length: int, direction: Direction) -> None:
        if self.error is not None:
            return
        try:
            self.writer.write(ethernet_views(views, length), direction)
        except (OSError, ValueError) as exc:
            # A half-written block makes the rest of the file unreadable: stop here.
            self.error = str(exc)
            log.error("packet capture stopped after %d frames: %s", self.writer.frames, exc)

    def stats(self) -> dict[str, object]:
        return {"frames": self.writer.frames, "bytes": self.writer.bytes, "error": self.error}

    def close(self) -> None:
        """Close the capture file; ``inner`` belongs to whoever opened it."""
        try:
            self.writer.close()
        except OSError as exc:
            self.error = self.error or str(exc)
            log.error("packet capture: closing the file failed: %s", exc)
