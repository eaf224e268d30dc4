"""Stand-ins for what a device talks to besides its driver, for tests: the packet backend and
the interrupt sink.

``FakeBackend`` is an in-memory PacketBackend (frames queued for the guest, frames the guest
sent), ``FdBackend`` the same over a real socket fd, as a TAP is, for the C TX and RX bursts,
and ``FakeIrq`` an InterruptSink that records the vectors raised. :mod:`harness.testing.mockdriver`
wires them to a device and its mock driver (and re-exports them).
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Sequence

__all__ = ["FakeBackend", "FakeIrq", "FdBackend"]


class FakeBackend:
    """In-memory PacketBackend: ``rx`` frames go to the guest, ``tx`` collects guest frames."""

    def __init__(self) -> None:
        self.rx: deque[bytes] = deque()
        self.tx: list[bytes] = []
        self.fail_writes = False

    def fileno(self) -> int:
        return -1

    def readv(self, views: Sequence[memoryview]) -> int:
        if not self.rx:
            return 0
        frame = memoryview(self.rx.popleft())
        done = 0
        for v in views:
            n = min(len(v), len(frame) - done)
            v[:n] = frame[done : done + n]
            done += n
            if done == len(frame):
                break
        return done

    def writev(self, views: Sequence[memoryview]) -> None:
        if self.fail_writes:
            raise OSError(105, "No buffer space available")
        self.tx.append(b"".join(views))


class FdBackend(FakeBackend):
    """A FakeBackend over a real fd, as a TAP is: the device's C bursts
    (harness.virtio.fastpath) write and read frames on ``io_fd()`` themselves, the Python path
    through ``writev`` / ``readv`` on the same socket (SOCK_SEQPACKET: one record per frame); a
    refused write is counted, not raised, as the TAP does. ``frames()`` drains what the device
    sent, ``deliver()`` queues a frame for it to receive. Its ``fileno()`` is that socket, so
    a DeviceLoop polls it as it polls a TAP."""

    def __init__(self) -> None:
        super().__init__()
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self.peer.setblocking(False)
        self.write_errors = 0
        self.read_errors = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def io_fd(self) -> int:
        return self.sock.fileno()

    def tx_failed(self, count: int, err: int) -> None:
        self.write_errors += count

    def rx_failed(self, err: int) -> None:
        self.read_errors += 1

    def deliver(self, frame: bytes) -> None:
        self.peer.send(frame)

    def readv(self, views: Sequence[memoryview]) -> int:
        try:
            return os.readv(self.sock.fileno(), views)
        except BlockingIOError:
            return -1
        except OSError:
            self.read_errors += 1
            return -1

    def writev(self, views: Sequence[memoryview]) -> None:
        try:
            os.writev(self.sock.fileno(), views)
        except OSError:
            self.write_errors += 1

    def frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


class FakeIrq:
    """InterruptSink that records the vectors raised."""

    def __init__(self) -> None:
        self.vectors: list[int] = []

    def trigger(self, vector: int) -> None:
        self.vectors.append(vector)

    def count(self, vector: int) -> int:
        return self.vectors.count(vector)
