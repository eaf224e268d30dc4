"""The host end of hnet's performance workloads: UDP counts and floods, a TCP echo.

Served by :class:`harness.net.peer.Peer` in its selector loop: :class:`UdpPerf` on the UDP
perf port (port base + 3, hnet udp-tx/udp-rx; the datagram layout is in guest/src/hnetperf.h)
and :func:`register_echo` on the TCP echo port (port base + 4, hnet tcp-rr). They measure,
they do not verify a stream. Selector data is a no-argument callable, as in the Peer.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import time
from functools import partial
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MAX_FLOOD_RATE", "MAX_FLOOD_SECONDS", "UdpPerf", "register_echo"]

#: Longest host->guest flood a guest may ask for, and the highest rate (bounds the peer's CPU).
MAX_FLOOD_SECONDS = 60.0
MAX_FLOOD_RATE = 500_000


class UdpPerf:
    """The host end of hnet's udp-tx and udp-rx (the datagram layout is in guest/src/hnet.c).

    Every datagram is kind byte + 8-byte tag (+ little-endian u64 fields): ``D`` data, counted
    per tag with first and last arrival; ``Q`` query, answered ``R tag count first_ns last_ns``;
    ``S tag size ms rate`` floods the sender with ``size``-byte ``D`` datagrams at ``rate``
    per second for ``ms`` milliseconds, then sends ``E tag sent`` a few times.
    """

    def __init__(self, sock: socket.socket, clock: Any = time.monotonic_ns) -> None:
        self.sock = sock
        self.clock = clock
        #: tag -> [count, first ns, last ns]; only the newest few tags are kept.
        self.counts: dict[int, list[int]] = {}

    def register(self, sel: selectors.BaseSelector) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sel.register(self.sock, selectors.EVENT_READ, self.on_readable)

    def on_readable(self) -> None:
        for _ in range(256):  # bounded batch, as the Peer's UDP echo
            try:
                data, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            self.on_datagram(data, addr)

    def on_datagram(self, data: bytes, addr: Any) -> None:
        if len(data) < 9:
            return
        kind, tag = data[0], int.from_bytes(data[1:9], "little")
        if kind == ord("D"):
            entry = self.counts.get(tag)
            now = self.clock()
            if entry is None:
                if len(self.counts) >= 16:
                    self.counts.pop(next(iter(self.counts)))
                self.counts[tag] = [1, now, now]
            else:
                entry[0] += 1
                entry[2] = now
        elif kind == ord("Q"):
            count, first, last = self.counts.get(tag, [0, 0, 0])
            self.sock.sendto(b"R" + struct.pack("<4Q", tag, count, first, last), addr)
        elif kind == ord("S") and len(data) >= 33:
            size, ms, rate = struct.unpack_from("<3Q", data, 9)
            self.flood(tag, addr, size, ms / 1000.0, rate)

    def flood(self, tag: int, addr: Any, size: int, seconds: float, rate: int) -> int:
        """Send ``size``-byte data datagrams at ``rate``/s for ``seconds``; returns how many.

        Paced, not as fast as possible: an unpaced Python loop would take a whole host core
        from the two that QEMU and the device server share, and the TAP drops the excess
        anyway. Blocks the peer's loop meanwhile (nothing else runs during a benchmark)."""
        size = min(max(size, 17), 1472)
        seconds = min(max(seconds, 0.0), MAX_FLOOD_SECONDS)
        rate = min(max(rate, 1), MAX_FLOOD_RATE)
        payload = bytearray(size)
        payload[0] = ord("D")
        payload[1:9] = tag.to_bytes(8, "little")
        sent = 0
        t0 = time.monotonic()
        end = t0 + seconds
        burst = max(1, min(64, rate // 1000))
        while True:
            now = time.monotonic()
            if now >= end:
                break
            ahead = t0 + sent / rate - now
            if ahead > 0:
                time.sleep(ahead)
                continue
            for _ in range(burst):
                payload[9:17] = sent.to_bytes(8, "little")
                try:  # noqa: SIM105 (the hot loop: no context manager per datagram)
                    self.sock.sendto(payload, addr)
                except OSError:
                    pass  # ENOBUFS: dropped on the host, counted as sent (offered load)
                sent += 1
        end_msg = b"E" + struct.pack("<2Q", tag, sent)
        for _ in range(5):  # the end marker may be dropped like any datagram
            time.sleep(0.02)
            with contextlib.suppress(OSError):
                self.sock.sendto(end_msg, addr)
        return sent


def register_echo(sel: selectors.BaseSelector, lsock: socket.socket) -> None:
    """Serve a TCP echo on the listening ``lsock`` through ``sel`` (hnet tcp-rr)."""
    sel.register(lsock, selectors.EVENT_READ, partial(_accept_echo, sel, lsock))


def _accept_echo(sel: selectors.BaseSelector, lsock: socket.socket) -> None:
    conn, addr = lsock.accept()
    conn.setblocking(False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    log.info("rr: connection from %s", addr)
    sel.register(conn, selectors.EVENT_READ, partial(_on_echo, sel, conn))


def _on_echo(sel: selectors.BaseSelector, conn: socket.socket) -> None:
    try:
        data = conn.recv(65536)
        if data:
            # Requests are small and the guest waits for each answer: the send buffer cannot
            # fill, so a blocking sendall never stalls the loop for long.
            conn.setblocking(True)
            conn.sendall(data)
            conn.setblocking(False)
            return
    except BlockingIOError:
        return
    except OSError as e:
        log.info("rr: %s", e)
    sel.unregister(conn)
    conn.close()
