"""The measurement switches of the performance work: the ledger-off pass-through
(HARNESS_LEDGER=off) and the server loop's arrival estimate for DMA reply latency."""

from __future__ import annotations

import select
import selectors
import socket
import time
from typing import Any

import pytest

from harness.dma import Direction, GuestMemory, build_mapops
from harness.dma.factory import LEDGER_ENV
from harness.server.loop import DeviceLoop
from harness.vfu.dmaregs import DmaRegistry

P = 0x1000
RW = 0x100000


def _memory() -> GuestMemory:
    mem = GuestMemory()
    mem.add_region(RW, memoryview(bytearray(4 * P)), writable=True)
    return mem


def test_ledger_off_checks_and_counts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEDGER_ENV, "off")
    _ops, ledger = build_mapops("direct", _memory(), bus_master=lambda: False)
    assert ledger is not None and ledger.checks is False
    # Bus Master Enable clear would refuse the map with checks on; off, it goes straight down.
    h = ledger.map_page(RW, 64, Direction.FROM_DEVICE, 0, ("rx0", 0, 0))
    assert h.error is None
    ledger.unmap_page(h, Direction.FROM_DEVICE)
    ledger.unmap_page(h, Direction.FROM_DEVICE)  # a double unmap is not even noticed
    s = ledger.stats()
    assert s["maps"] == 0 and s["violations_total"] == 0 and s["checks"] is False


def test_ledger_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LEDGER_ENV, raising=False)
    _ops, ledger = build_mapops("direct", _memory(), bus_master=lambda: False)
    assert ledger is not None and ledger.checks is True
    h = ledger.map_page(RW, 64, Direction.FROM_DEVICE, 0, ("rx0", 0, 0))
    assert h.error is not None and ledger.stats()["violations_total"] == 1


class _Endpoint:
    def __init__(self) -> None:
        self.message_origin = 0.0
        self.message_woke = False
        self.origins: list[float] = []
        self.woke: list[bool] = []

    def attach(self) -> bool:
        return True

    def fileno(self) -> int:
        return 0

    def run(self) -> int:
        self.origins.append(self.message_origin)
        self.woke.append(self.message_woke)
        return 0


class _Selector(selectors.DefaultSelector):
    """select() that returns the endpoint ready after the next of ``sleeps`` on the fake
    clock: 0 ready at once; more: nothing ready until a select that may wait has waited."""

    def __init__(self, clock: list[float], sleeps: list[float]) -> None:
        super().__init__()
        self.clock, self.sleeps = clock, sleeps

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if self.sleeps[0] > 0 and not timeout:
            return []
        self.clock[0] += self.sleeps.pop(0)
        return [(key, selectors.EVENT_READ) for key in self.get_map().values()]


def test_arrival_is_the_wake_up_of_a_sleeping_select_else_the_previous_one() -> None:
    clock = [100.0]
    sel = _Selector(clock, [0.5, 0.0, 0.0, 10e-6, 0.0])
    ep = _Endpoint()

    class _Dev:
        after_reset: Any = None

    a, b = socket.socketpair()
    loop = DeviceLoop(ep, _Dev(), None, a, selector=sel,  # type: ignore[arg-type]
                      clock=lambda: clock[0])
    sel.register(b, selectors.EVENT_READ, loop._on_endpoint)
    loop.dispatch(1.0)           # slept 0.5 s: the request woke it at 100.5
    clock[0] += 0.02             # 20 ms of ring work, during which a request arrives
    loop.dispatch(0.0)           # returns at once at 100.52: it may have waited since 100.5
    clock[0] += 0.001
    loop.dispatch(0.0)
    clock[0] += 0.001
    loop.dispatch(1.0)           # nothing there: sleeps, a request ends it 10 us later
    clock[0] += 0.003
    loop.dispatch(1.0)           # may sleep, but one came during the 3 ms of work: no sleep
    assert ep.origins == [pytest.approx(100.5), pytest.approx(100.5), pytest.approx(100.52),
                          pytest.approx(100.52201, abs=1e-6), pytest.approx(100.52201, abs=1e-6)]
    assert ep.woke == [True, False, False, True, False]
    sel.close()
    a.close()
    b.close()


class _MappingEndpoint:
    """A vfio-user endpoint over a socket: each byte is one DMA_MAP it answers."""

    def __init__(self, sock: socket.socket, order: list[str]) -> None:
        self.sock, self.order = sock, order
        self.message_origin = 0.0
        self.dma_events = 0

    def attach(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def run(self) -> int:
        try:
            n = len(self.sock.recv(4096))
        except BlockingIOError:
            return 0
        self.dma_events += n
        self.order.append(f"answer {n}")
        return n


def _mapping_loop(poll_us: float) -> tuple[DeviceLoop, socket.socket, list[str], Any]:
    order: list[str] = []
    ours, guest = socket.socketpair()
    ours.setblocking(False)
    ep = _MappingEndpoint(ours, order)

    class _Dev:
        after_reset: Any = None

        def process(self) -> None:
            order.append("ring work")

        def rx_wanted(self) -> bool:
            return False

    class _Ledger:
        def housekeeping(self) -> None: ...

    loop = DeviceLoop(ep, _Dev(), _Ledger(), ours)  # type: ignore[arg-type]
    loop.dma_poll = poll_us / 1e6
    loop._attached = True
    loop._endpoint_fd = ours.fileno()
    loop._poll = select.poll()
    loop._poll.register(ours.fileno(), select.POLLIN)
    return loop, guest, order, ours


def test_dma_maps_are_answered_before_ring_work_while_the_guest_maps() -> None:
    loop, guest, order, ours = _mapping_loop(50_000)  # 50 ms: robust on a loaded host
    guest.send(b"m")
    loop.turn()                 # no DMA seen yet: ring work at once, nothing answered
    assert order == ["ring work"]
    loop._on_endpoint(0)        # the guest maps (e.g. after its kick)
    guest.send(b"m")            # ... and maps again while the device has ring work
    loop.turn()
    assert order == ["ring work", "answer 1", "answer 1", "ring work"]
    order.clear()
    loop.turn()                 # no new DMA: no waiting before ring work
    assert order == ["ring work"]
    guest.close()
    ours.close()
    loop.close()


@pytest.mark.parametrize("mode", ["spin", "block", "hybrid"])
def test_dma_window_answers_maps_in_both_poll_modes(mode: str) -> None:
    loop, guest, order, ours = _mapping_loop(50_000)
    loop.poll_spin = {"spin": float("inf"), "block": 0.0, "hybrid": 20e-6}[mode]
    guest.send(b"m")
    loop._on_endpoint(0)        # the guest maps ...
    guest.send(b"m")            # ... and maps again while the device has ring work
    loop.turn()
    assert order == ["answer 1", "answer 1", "ring work"]
    guest.close()
    ours.close()
    loop.close()


@pytest.mark.parametrize("mode", ["block", "hybrid"])
def test_block_poll_mode_sleeps_through_the_dma_window(monkeypatch: pytest.MonkeyPatch,
                                                       mode: str) -> None:
    """HARNESS_LOOP_POLL_MODE=block (hybrid: after 20 us of spinning) waits for the window in
    select(): a 200 ms window with no request costs next to no CPU (spin would burn all of it);
    spin stays the default and a mistyped mode is refused."""
    from harness.server.loop import POLL_MODE_ENV, poll_mode

    monkeypatch.delenv(POLL_MODE_ENV, raising=False)
    assert poll_mode() == "spin"
    monkeypatch.setenv(POLL_MODE_ENV, mode)
    loop, guest, order, ours = _mapping_loop(200_000)
    assert loop.poll_spin == (0.0 if mode == "block" else 20e-6)
    guest.send(b"m")
    loop._on_endpoint(0)        # a DMA message: the next turn waits for more
    cpu, wall = time.process_time(), time.monotonic()
    loop.turn()
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    assert order[-1] == "ring work" and wall >= 0.2
    assert cpu < 0.05, f"{cpu * 1e3:.0f} ms of CPU in a 200 ms blocked window"
    guest.close()
    ours.close()
    loop.close()
    monkeypatch.setenv(POLL_MODE_ENV, "blok")
    with pytest.raises(ValueError, match=POLL_MODE_ENV):
        poll_mode()


def test_wire_take_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """HARNESS_WIRE_TAKE=scan is WireTaker.take without its fast path (the A/B's other side);
    fast by default. That the fast path still counts every error reply is test_hostile_client's
    job (it fails with the fast path returning early unconditionally)."""
    from harness.vfu.context import VfuContext
    from harness.vfu.wire import WIRE_TAKE_ENV

    monkeypatch.delenv(WIRE_TAKE_ENV, raising=False)
    fast = VfuContext(str(tmp_path / "a.sock"))
    monkeypatch.setenv(WIRE_TAKE_ENV, "scan")
    scan = VfuContext(str(tmp_path / "b.sock"))
    try:
        assert fast._wire.fast is True and scan._wire.fast is False
        scan._wire.take()
        assert scan.counters.as_dict()["error_replies"] == 0
    finally:
        fast.close()
        scan.close()
    monkeypatch.setenv(WIRE_TAKE_ENV, "scna")
    with pytest.raises(ValueError, match="HARNESS_WIRE_TAKE"):
        VfuContext(str(tmp_path / "c.sock"))


def test_dmamap_microbench_runs_both_sides(capsys: pytest.CaptureFixture[str]) -> None:
    from harness.bench import dmamap

    rows = dmamap.run(regions=20, ops=50, seed=3)
    assert {(r["workload"], r["variant"]) for r in rows} >= {
        ("region", "tree"), ("region", "sorted"), ("wire", "scan"), ("wire", "fast")}
    assert all(r["p50_ns"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        dmamap.main(["--ops", "0"])
    assert "--ops >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("order", ["ready", "endpoint"])
def test_loop_order_switch(monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    """HARNESS_LOOP_ORDER=endpoint handles the vfio-user socket first among the events of one
    wake-up (a DMA_MAP is not answered after the RX burst of a TAP that became readable
    before it); ready (the default) keeps epoll's order; a mistyped order is refused."""
    from harness.server.loop import ORDER_ENV, endpoint_first

    monkeypatch.delenv(ORDER_ENV, raising=False)
    assert endpoint_first() is False
    monkeypatch.setenv(ORDER_ENV, order)
    loop, guest, handled, ours = _mapping_loop(0)
    assert loop.endpoint_first is (order == "endpoint")
    tap, peer = socket.socketpair()
    loop.selector.register(tap, selectors.EVENT_READ, lambda _m: handled.append("rx burst"))
    loop.selector.register(ours, selectors.EVENT_READ, loop._on_endpoint)
    loop._endpoint_fd = ours.fileno()
    peer.send(b"frame")  # the TAP is readable first, then the guest maps
    guest.send(b"m")
    loop.dispatch(0.0)
    first = "answer 1" if order == "endpoint" else "rx burst"
    assert handled[0] == first and set(handled) == {"answer 1", "rx burst"}
    for s in (tap, peer, guest, ours):
        s.close()
    loop.close()
    monkeypatch.setenv(ORDER_ENV, "first")
    with pytest.raises(ValueError, match=ORDER_ENV):
        endpoint_first()


def test_dma_window_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 12: no waiting for the guest's next DMA message unless HARNESS_LOOP_POLL_US says
    so (a turn after DMA messages goes straight to ring work)."""
    from harness.server.loop import POLL_US_ENV, dma_poll

    monkeypatch.delenv(POLL_US_ENV, raising=False)
    assert dma_poll() == 0
    monkeypatch.setenv(POLL_US_ENV, "250")
    assert dma_poll() == 250e-6
    monkeypatch.delenv(POLL_US_ENV)
    loop, guest, order, ours = _mapping_loop(dma_poll() * 1e6)
    guest.send(b"m")
    loop._on_endpoint(0)   # the guest maps ...
    guest.send(b"m")       # ... and maps again: the turn goes to ring work, not to the socket
    loop.turn()
    assert order == ["answer 1", "ring work"]
    loop._on_endpoint(0)   # the next wake-up answers it
    assert order == ["answer 1", "ring work", "answer 1"]
    guest.close()
    ours.close()
    loop.close()


def test_a_dma_wait_is_filed_by_what_the_loop_was_doing_when_it_came() -> None:
    reg = DmaRegistry()
    for woke, entry_after in ((True, 10e-6), (False, 300e-6), (False, 200e-6)):
        now = time.monotonic()
        reg.message_origin, reg.message_woke, reg.run_entry = now - entry_after, woke, now
        reg._timed("map", now)
    lat = reg.latency
    assert lat["map_queue"].count == 3
    assert lat["map_queue_woke"].count == 1 and lat["map_queue_busy"].count == 2
    assert lat["map_queue_woke"].summary()["max_us"] == pytest.approx(10, abs=1)
    assert lat["map_queue_busy"].summary()["max_us"] == pytest.approx(300, abs=1)
    assert lat["unmap_queue_woke"].count == 0


def test_a_message_of_many_regions_counts_its_wait_once() -> None:
    """An unmap of a whole range calls back once per region inside one vfu_run_ctx: the
    later regions' 'library' part would hold every callback before them."""
    reg = DmaRegistry()
    now = time.monotonic()
    reg.message_origin, reg.message_woke, reg.run_entry = now - 20e-6, True, now - 10e-6
    for k in range(3):
        reg._timed("unmap", time.monotonic() - 5e-6 * (k + 1))
    lat = reg.latency
    assert lat["unmap_callback"].count == 3
    assert lat["unmap_library"].count == lat["unmap_reply"].count == 1
    assert lat["unmap_queue"].count == lat["unmap_queue_woke"].count == 1
    reg.run_entry = time.monotonic()  # the next vfu_run_ctx call: counted again
    reg._timed("unmap", time.monotonic())
    assert reg.latency["unmap_library"].count == 2


def test_callback_timings_are_filed_after_the_reply_not_inside_the_callback() -> None:
    """Inside the callback only the clock is read: the recorders change when the context
    files them (after vfu_run_ctx, the reply sent) or when anyone reads them."""
    reg = DmaRegistry()
    now = time.monotonic()
    reg.message_origin, reg.message_woke, reg.run_entry = now - 20e-6, False, now - 10e-6
    recorders = reg._latency
    reg._timed("map", now)
    assert recorders["map_callback"].count == 0 and reg.events == 1
    reg.file_latency()
    assert recorders["map_callback"].count == recorders["map_queue_busy"].count == 1
    reg.file_latency()  # nothing twice
    assert recorders["map_callback"].count == 1
