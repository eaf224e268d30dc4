"""The device loop (harness.server.loop), run for real over the mock driver with fake edges."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from harness.dma import Direction, DmaLedger, build_mapops
from harness.server.loop import DeviceLoop
from harness.testing.mockdriver import FakeIrq, MockDriver, MockMemory
from harness.testing.serverfakes import FakeEndpoint, PolledBackend, deadline
from harness.virtio.net import VirtioNetDevice
from harness.virtio.netdefs import TX_HOLDOFF_MIN

HDR = bytes(12)
HDR_RX = bytes(10) + b"\x01\x00"  # num_buffers = 1, as the device writes it


@dataclass
class Served:
    loop: DeviceLoop
    device: VirtioNetDevice
    driver: MockDriver
    ledger: DmaLedger
    endpoint: FakeEndpoint
    backend: PolledBackend
    clock: list[float]
    events: list[str]


def serve(*, readable: bool = True, batch: int = 256, attach_after: int = 1,
          idle_timeout: float = 0.0, init: bool = True) -> Served:
    mem = MockMemory(8 << 20)
    ops, ledger = build_mapops("direct", mem.memory, bus_master=lambda: True)
    assert ledger is not None
    backend = PolledBackend(readable=readable)
    dev = VirtioNetDevice(ops, FakeIrq(), backend, mac=bytes(6), queue_size=64,
                          bus_master=lambda: True, batch=batch)
    driver = MockDriver(dev, mem)
    if init:
        driver.init()
    endpoint = FakeEndpoint(attach_after=attach_after)
    clock = [0.0]
    events: list[str] = []
    loop = DeviceLoop(endpoint, dev, ledger, backend, idle_timeout=idle_timeout,
                      on_attached=lambda: events.append("attached"),
                      sample_iova=lambda: events.append(f"sample@{clock[0]}"),
                      clock=lambda: clock[0])
    return Served(loop, dev, driver, ledger, endpoint, backend, clock, events)


@pytest.fixture
def served() -> Iterator[Served]:
    s = serve()
    yield s
    close(s)


def close(s: Served) -> None:
    s.loop.close()
    s.endpoint.close()
    s.backend.close()


def polled_fds(loop: DeviceLoop) -> set[int]:
    return {key.fd for key in loop.selector.get_map().values()}


def test_serve_attaches_handles_requests_and_stops_on_disconnect() -> None:
    s = serve(attach_after=3, idle_timeout=0.01)
    try:
        s.endpoint.peer.sendall(b"abc")  # three "requests" queued before the client attaches
        s.endpoint.peer.shutdown(socket.SHUT_WR)  # ... then it goes away
        with deadline(5.0):
            s.loop.serve()
        assert s.endpoint.attach_calls == 3
        assert s.events[0] == "attached"
        assert s.endpoint.requests == 3
        assert s.loop.stop and s.loop.turns >= 1
    finally:
        close(s)


def test_stop_while_waiting_for_the_client_returns_without_attaching() -> None:
    s = serve(attach_after=10**9, idle_timeout=5.0)
    a, b = socket.socketpair()
    try:
        b.sendall(b"x")  # readable: its handler asks the loop to stop, as `quit` does
        s.loop.selector.register(a, 1, lambda _mask: s.loop.request_stop())
        with deadline(2.0):
            s.loop.serve()
        assert s.endpoint.attach_calls == 1 and "attached" not in s.events
        assert s.loop.turns == 0
    finally:
        a.close()
        b.close()
        close(s)


def test_backend_polled_only_while_the_device_wants_frames(served: Served) -> None:
    s = served
    fd = s.backend.fileno()
    s.loop.run_once()
    assert fd in polled_fds(s.loop)  # DRIVER_OK with RX enabled: poll the TAP
    s.driver.reset()
    s.loop.run_once()
    assert fd not in polled_fds(s.loop)  # no driver: frames stay in the TAP


def test_frames_waiting_are_taken_as_soon_as_polling_starts(served: Served) -> None:
    s = served
    rx = s.driver.queues[0]
    frame = HDR_RX + b"x" * 60
    s.backend.rx.append(frame)
    rx.add(in_=[2048], publish=True)
    rx.kick_if_needed()
    s.loop.turn()  # registers the backend and takes the frame in the same turn
    assert [rx.written(h, n) for h, n in rx.get_used()] == [frame]


def test_tx_work_left_over_a_batch_means_no_sleeping() -> None:
    s = serve(readable=False, batch=4, idle_timeout=2.0)
    try:
        tx = s.driver.queues[1]
        frames = [HDR + bytes([i]) * 60 for i in range(10)]
        for f in frames:
            tx.add([f[:12], f[12:]])
        tx.kick_if_needed()
        s.loop.run_once()  # idle: sleeps up to idle_timeout only if nothing is pending
        started = time.monotonic()
        for _ in range(10):
            if len(s.backend.tx) == len(frames):
                break
            s.loop.run_once()
        assert time.monotonic() - started < 1.0
        assert s.backend.tx == frames
    finally:
        close(s)


def test_reset_checks_for_leaks_once(served: Served) -> None:
    s = served
    s.loop.run_once()
    leaked = s.ledger.map_page(0x100000, 64, Direction.TO_DEVICE)  # a mapping nobody will unmap
    assert not s.ledger.mapping_error(leaked)
    s.driver.reset()
    s.loop.run_once()
    stats = s.ledger.stats()
    assert stats["violations_total"] == 1, stats["violations"]
    s.loop.run_once()
    assert s.ledger.stats()["violations_total"] == 1  # not checked again without a reset


def test_iova_space_sampled_every_half_second(served: Served) -> None:
    s = served
    for t in (0.0, 0.1, 0.4, 0.5, 0.6, 1.2):
        s.clock[0] = t
        s.loop.turn()
    assert [e for e in s.events if e.startswith("sample")] == [
        "sample@0.0", "sample@0.5", "sample@1.2"]


def test_reset_and_reinit_in_one_round_is_not_a_leak(served: Served) -> None:
    s = served
    s.loop.run_once()
    s.driver.reset()
    s.driver.init()  # in one vfu_run_ctx batch: no loop turn in between
    s.loop.run_once()
    stats = s.ledger.stats()
    assert stats["violations_total"] == 0, stats["violations"]


def test_a_tx_hold_off_wakes_the_loop_without_a_kick(monkeypatch: pytest.MonkeyPatch) -> None:
    """HARNESS_TX_HOLDOFF_US: frames the driver adds while the ring is held off (no kick) are
    taken when the hold-off is up, not after the idle timeout."""
    monkeypatch.setenv("HARNESS_TX_HOLDOFF_US", "5000")
    s = serve(readable=False, idle_timeout=2.0)
    try:
        tx = s.driver.queues[1]
        n = TX_HOLDOFF_MIN
        frames = [HDR + bytes([i]) * 60 for i in range(n + 4)]
        for f in frames[:n]:
            tx.add([f])
        tx.kick_if_needed()
        s.loop.run_once()  # the kick, then the flush: held off
        assert len(s.backend.tx) == n and s.device.next_timer() is not None
        for f in frames[n:]:
            tx.add([f])
        assert not tx.kick_if_needed()
        started = time.monotonic()
        for _ in range(5):
            s.loop.run_once()
            if len(s.backend.tx) == len(frames):
                break
        assert time.monotonic() - started < 0.5
        assert s.backend.tx == frames
    finally:
        close(s)


def test_sub_millisecond_waits_are_not_rounded_up_to_a_millisecond(served: Served) -> None:
    """epoll rounds its timeout up to whole milliseconds; a 300 us hold-off must not wait 1 ms."""
    took = []
    for _ in range(21):
        started = time.monotonic()
        served.loop.dispatch(0.0003)
        took.append(time.monotonic() - started)
    took.sort()
    assert 0.0003 <= took[10] < 0.0009
