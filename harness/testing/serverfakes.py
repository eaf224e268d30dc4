"""Stand-ins for the device loop's edges (vfio-user endpoint, pollable backend), so unit tests
run the real ``harness.server.loop.DeviceLoop`` over the mock driver without libvfio-user;
and ``deadline``, so a loop that never returns fails its test instead of hanging it."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from harness.testing.mockdriver import FakeBackend
from harness.vfu.errors import Disconnected


class FakeEndpoint:
    """A vfio-user endpoint over a socketpair: the test holds ``peer`` and plays the client.

    ``attach()`` succeeds from its ``attach_after``-th call on; ``run()`` consumes whatever the
    peer sent (one "request" per byte) and raises Disconnected once the peer has closed.
    """

    def __init__(self, attach_after: int = 1) -> None:
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)
        self.attach_after = attach_after
        self.attach_calls = 0
        self.requests = 0

    def attach(self) -> bool:
        self.attach_calls += 1
        return self.attach_calls >= self.attach_after

    def fileno(self) -> int:
        return self.sock.fileno()

    def run(self) -> int:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return 0
        if not data:
            raise Disconnected(107, "client closed the connection")
        self.requests += len(data)
        return len(data)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


class PolledBackend(FakeBackend):
    """A FakeBackend with a real fd for the loop's selector.

    ``readable=True``: always readable, as a TAP with frames waiting is, so the loop asks the
    device for frames on every turn while it polls the backend. ``readable=False``: never
    readable, so a select() on it sleeps for its whole timeout.
    """

    def __init__(self, *, readable: bool = True) -> None:
        super().__init__()
        self._r, self._w = os.pipe()
        if readable:
            os.write(self._w, b"!")  # never read: level-triggered readiness stays on

    def fileno(self) -> int:
        return self._r

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging when a loop under test never returns
    (SIGALRM; the main thread only, which is where pytest runs tests)."""

    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
