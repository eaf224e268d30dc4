"""The C bursts yield to a waiting vfio-user request (HARNESS_DMA_YIELD), and the loop sets and
clears the fd they look at.

While the guest maps through a vIOMMU, its vCPU waits for each DMA_MAP reply; a burst of up to
256 frames ahead of it would make it wait for all of them. With ``FastPath.yield_fd`` readable, a
burst stops after a few frames with YIELD, the queue stays pending (TX) or the backend readable
(RX), and nothing is lost or reordered when the work resumes.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
from typing import Any

import pytest

from harness.server import loop as loopmod
from harness.server.loop import DeviceLoop
from harness.testing.mockdriver import FdBackend, NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio.netdefs import DEFAULT_FEATURES

QSIZE = 32
_HDR = bytes(C.NET_HDR_SIZE)


def _rig() -> NetRig:
    r = net_rig(ledger=True, backend=FdBackend(), bursts=True, queue_size=QSIZE,
                mem_size=1 << 20, features=DEFAULT_FEATURES)  # fmt: skip
    assert r.device.fastpath is not None
    return r


@pytest.fixture
def waiting() -> Any:
    """A socket with a request waiting on it (readable), and its peer."""
    a, b = socket.socketpair()
    b.send(b"x")
    yield a
    a.close()
    b.close()


def _tx_frames(r: NetRig, n: int) -> list[bytes]:
    frames = [_HDR + bytes([k]) * (60 + k) for k in range(n)]
    for f in frames:
        r.tx.add(out=[f])
    r.tx.kick()
    return frames


def test_a_tx_burst_stops_for_a_waiting_request_and_loses_nothing(waiting: socket.socket) -> None:
    r = _rig()
    fast = r.device.fastpath
    assert fast is not None
    frames = _tx_frames(r, 10)
    r.device.yield_to(waiting.fileno())
    r.device.process()
    backend = r.backend
    assert isinstance(backend, FdBackend)
    sent = backend.frames()  # (each call returns what came since the last)
    assert len(sent) == 3 and fast.yields == 1  # looked at every 4th chain
    assert r.device.has_work()  # the queue stays pending: the loop comes back at once
    r.device.yield_to(-1)
    r.device.process()
    assert sent + backend.frames() == frames
    assert fast.yields == 1 and not r.device.has_work()
    assert [h for h, _ in r.tx.get_used()] == list(range(10))  # completed in order


def test_a_tx_burst_runs_whole_while_nothing_waits() -> None:
    a, b = socket.socketpair()  # nothing sent: not readable
    r = _rig()
    fast = r.device.fastpath
    assert fast is not None
    _tx_frames(r, 10)
    r.device.yield_to(a.fileno())
    r.device.process()
    backend = r.backend
    assert isinstance(backend, FdBackend)
    assert len(backend.frames()) == 10 and fast.yields == 0
    a.close()
    b.close()


def test_an_rx_burst_stops_for_a_waiting_request_and_loses_nothing(
        waiting: socket.socket) -> None:  # fmt: skip
    r = _rig()
    fast = r.device.fastpath
    assert fast is not None
    for _ in range(16):
        r.rx.add(in_=[2048])
    frames = [struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0) + bytes([k]) * (60 + k)
              for k in range(10)]
    backend = r.backend
    assert isinstance(backend, FdBackend)
    for f in frames:
        backend.deliver(f)
    r.device.yield_to(waiting.fileno())
    r.device.on_backend_readable()
    got = r.rx.get_used()
    assert len(got) == 3 and fast.yields == 1
    r.device.yield_to(-1)
    r.device.on_backend_readable()  # the backend is still readable: the loop calls again
    got += r.rx.get_used()
    assert [r.rx.written(h, n)[C.NET_HDR_SIZE:] for h, n in got] == \
        [f[C.NET_HDR_SIZE:] for f in frames]
    assert fast.rx_frames == 10 and fast.yields == 1


class _Endpoint:
    """A vfio-user endpoint whose every readable byte is one DMA_MAP it answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dma_events = 0
        self.message_origin = 0.0

    def attach(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def run(self) -> int:
        with contextlib.suppress(BlockingIOError):
            self.dma_events += len(self.sock.recv(4096))
        return 0


class _Device:
    after_reset: Any = None

    def __init__(self, ep: _Endpoint) -> None:
        self.ep = ep
        self.yields: list[int] = []
        self.answered_before_work: list[int] = []

    def yield_to(self, fd: int) -> None:
        self.yields.append(fd)

    def process(self) -> None:
        self.answered_before_work.append(self.ep.dma_events)

    def has_work(self) -> bool:
        return False

    def rx_wanted(self) -> bool:
        return False


class _Ledger:
    def housekeeping(self) -> None:
        pass


def test_the_loop_yields_while_the_guest_maps_and_answers_before_ring_work(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv(loopmod.DMA_YIELD_ENV, "on")
    a, b = socket.socketpair()
    a.setblocking(False)
    ep = _Endpoint(a)
    dev = _Device(ep)
    clock = [10.0]
    backend, peer = socket.socketpair()
    loop = DeviceLoop(ep, dev, _Ledger(), backend,  # type: ignore[arg-type]
                      selector=selectors.DefaultSelector(), clock=lambda: clock[0])
    loop.connected()
    loop.turn()
    assert dev.yields == []  # no DMA yet: the bursts run whole
    b.send(b"m")             # a DMA_MAP
    loop.dispatch(0.0)
    b.send(b"m")             # the next one comes during the turn's work
    loop.turn()
    assert dev.yields == [a.fileno()]
    assert dev.answered_before_work[-1] == 2  # answered before process(), not after it
    loop.turn()                                # (the one answered in the turn counts now)
    assert dev.yields == [a.fileno()]
    clock[0] += loopmod.DMA_ACTIVE + 0.1      # no DMA for a while: bursts run whole again
    loop.turn()
    assert dev.yields == [a.fileno(), -1]
    b.send(b"m")
    loop.dispatch(0.0)
    loop.turn()
    assert dev.yields[-1] == a.fileno()
    loop._detach()  # the client left: its fd number may be anything's next
    assert dev.yields[-1] == -1
    loop.close()
    for s in (a, b, backend, peer):
        s.close()
