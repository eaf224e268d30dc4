"""Device introspection: `stats` and `dump-queue` over the real control server and the mock
driver, and the data path's checks on garbage rings. The renderings and `harness stats` /
`harness dump-queue` are tests/unit/test_inspect_render.py (on this module's box)."""

from __future__ import annotations

import json
import logging
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import inspect
from harness.dma import DmaLedger, build_mapops
from harness.server.control import ControlServer, device_commands
from harness.testing.mockdriver import FakeBackend, FakeIrq, MockDriver, MockMemory, MockQueue
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES, VirtioNetDevice
from harness.virtio.virtqueue import DUMP_BUDGET_PER_DESCRIPTOR

HDR = bytes(12)
INDIRECT = DEFAULT_FEATURES | (1 << C.F_INDIRECT_DESC)
NO_EVENT_IDX = DEFAULT_FEATURES & ~(1 << C.F_EVENT_IDX)
_DESC = struct.Struct("<QIHH")
OUTSIDE = 0x7F00_0000  # no guest memory there (MockMemory is 4 MiB at 1 MiB)


class Served:
    """A real ControlServer with the device's command table, served by a thread's selector."""

    def __init__(self, path: Path, stats: Callable[[], dict[str, Any]],
                 dump_queue: Callable[[int], dict[str, Any]]) -> None:
        self.path = path
        self.stops = 0
        self.server = ControlServer.listen(
            path, device_commands(stats=stats, stop=self._stop, dump_queue=dump_queue))
        self.sel = selectors.DefaultSelector()
        self.server.register(self.sel)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        self.stops += 1

    def _serve(self) -> None:
        while not self._done.is_set():
            for key, mask in self.sel.select(timeout=0.01):
                key.data(mask)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.server.close()
        self.sel.close()


@dataclass
class Box:
    """A net device over mock memory with a real ledger, and its control socket."""

    device: VirtioNetDevice
    driver: MockDriver
    ledger: DmaLedger
    irq: FakeIrq
    backend: FakeBackend
    served: Served

    @property
    def rx(self) -> MockQueue:
        return self.driver.queues[0]

    @property
    def tx(self) -> MockQueue:
        return self.driver.queues[1]

    def ask(self, cmd: str, **args: object) -> dict[str, Any]:
        return inspect.request(self.served.path, cmd, timeout=5.0, **args)

    def dump(self, queue: int) -> dict[str, Any]:
        reply = self.ask("dump-queue", queue=queue)
        assert reply["ok"] is True, reply
        dump = reply["dump"]
        assert isinstance(dump, dict)
        return dump

    def stats(self) -> dict[str, Any]:
        reply = self.ask("stats")
        assert reply["ok"] is True, reply
        return reply

    def queue_stats(self, name: str) -> dict[str, Any]:
        per = self.stats()["stats"]["device"][name]
        assert isinstance(per, dict)
        return per


def make_box(tmp_path: Path, *, queue_size: int = 8, features: int | None = None,
             init: bool = True) -> Box:
    mem = MockMemory()
    backend, irq = FakeBackend(), FakeIrq()
    ops, ledger = build_mapops("direct", mem.memory, bus_master=lambda: True)
    assert ledger is not None
    dev = VirtioNetDevice(ops, irq, backend, mac=bytes.fromhex("525400123456"),
                          queue_size=queue_size, features=features, bus_master=lambda: True)
    driver = MockDriver(dev, mem)
    if init:
        driver.init()

    def stats() -> dict[str, Any]:  # DeviceServer.stats()'s shape, minus the vfio-user parts
        return {"device": dev.stats(), "ledger": ledger.stats(),
                "irq": {"sent": len(irq.vectors), "unwired": 0}}

    served = Served(tmp_path / "net0-control.sock", stats, dev.dump_queue)
    return Box(dev, driver, ledger, irq, backend, served)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = make_box(tmp_path)
    yield b
    b.served.close()


@pytest.fixture
def box_factory(tmp_path: Path) -> Iterator[Callable[..., Box]]:
    made: list[Box] = []

    def factory(**kw: Any) -> Box:
        b = make_box(tmp_path / str(len(made)), **kw)
        made.append(b)
        return b

    (tmp_path / "0").mkdir()
    (tmp_path / "1").mkdir()
    yield factory
    for b in made:
        b.served.close()


def table(q: MockQueue) -> list[dict[str, int]]:
    """The descriptor table as the driver wrote it, decoded independently of the device."""
    raw = q.mem.read(q.desc, 16 * q.size)
    return [{"addr": a, "len": n, "flags": f, "next": x} for a, n, f, x in _DESC.iter_unpack(raw)]


# ---- dump-queue of a known ring state -------------------------------------------------------


def test_dump_equals_what_the_driver_wrote(box: Box) -> None:
    frames = [[HDR, b"a" * 60], [HDR + b"b" * 100], [HDR, b"c" * 10, b"d" * 20]]
    heads = [box.tx.add(f) for f in frames]  # published, not kicked
    d = box.dump(1)
    assert (d["index"], d["name"], d["size"], d["enabled"], d["broken"]) == (1, "tx0", 8,
                                                                               True, False)
    assert d["addresses"] == {"desc": box.tx.desc, "avail": box.tx.avail, "used": box.tx.used}
    assert d["event_idx"] is True and d["msix_vector"] == 2
    assert d["avail"]["idx"] == 3 and d["avail"]["flags"] == 0
    assert d["avail"]["ring"][:3] == heads and len(d["avail"]["ring"]) == 8
    assert d["descriptors"] == table(box.tx)
    assert d["used"]["idx"] == 0 and len(d["used"]["ring"]) == 8
    assert d["device"] == {"avail_idx": 0, "last_avail": 0, "used_idx": 0,
                           "used_unpublished": 0, "outstanding": 0, "notify": True}
    assert [c["head"] for c in d["in_flight"]] == heads
    for chain, head in zip(d["in_flight"], heads, strict=True):
        bufs = box.tx.buffers[head]
        assert chain["state"] == "available" and "error" not in chain
        assert [(e["addr"], e["len"]) for e in chain["descriptors"]] == [
            (b.iova, b.length) for b in bufs]
        assert chain["read_len"] == sum(b.length for b in bufs) and chain["write_len"] == 0
    assert "error" not in d

    box.tx.kick()
    box.device.process()
    d = box.dump(1)
    assert d["in_flight"] == []
    assert d["used"]["idx"] == 3
    assert d["used"]["ring"][:3] == [[h, 0] for h in heads]
    assert d["device"]["avail_idx"] == d["device"]["last_avail"] == d["device"]["used_idx"] == 3
    assert d["used"]["avail_event"] == 3  # EVENT_IDX: the device asks for the next kick


def test_dump_rx_buffers_and_popped_chains(box: Box) -> None:
    heads = [box.rx.add(in_=[1536]) for _ in range(4)]
    d = box.dump(0)
    assert [(c["head"], c["state"], c["write_len"]) for c in d["in_flight"]] == [
        (h, "available", 1536) for h in heads]
    # A chain the device holds right now (popped, mapped, not yet pushed) shows as popped.
    q = box.device.rx
    chain = q.pop()
    assert chain is not None
    d = box.dump(0)
    assert [c["state"] for c in d["in_flight"]] == ["popped"] + ["available"] * 3
    assert d["device"]["outstanding"] == 1 and d["device"]["last_avail"] == 1
    q.push(chain, 100)
    assert q.flush()
    d = box.dump(0)
    assert [c["head"] for c in d["in_flight"]] == heads[1:]
    assert d["used"]["ring"][0] == [heads[0], 100]


def test_dump_decodes_an_indirect_table(box_factory: Callable[..., Box]) -> None:
    b = box_factory(features=INDIRECT)
    head = b.tx.add_indirect([HDR, b"abc"])
    maps = b.ledger.maps
    (chain,) = b.dump(1)["in_flight"]
    assert chain["head"] == head and "error" not in chain
    top, *entries = chain["descriptors"]
    assert top["flags"] == C.DESC_F_INDIRECT and top["len"] == 32
    assert [(e["addr"], e["len"], e.get("indirect")) for e in entries] == [
        (buf.iova, buf.length, True) for buf in b.tx.buffers[head]]
    assert b.ledger.maps == maps + 1 and b.ledger.live == 6  # mapped, copied, unmapped


# ---- garbage rings: bounded replies, the data path's words, nothing raised ------------------


def _next_out_of_range(q: MockQueue, mem: MockMemory) -> None:
    q.write_desc(0, mem.alloc(16), 16, C.DESC_F_NEXT, 99)
    q.publish(0)


def _loop(q: MockQueue, mem: MockMemory) -> None:
    buf = mem.alloc(16)
    q.write_desc(0, buf, 16, C.DESC_F_NEXT, 1)
    q.write_desc(1, buf, 16, C.DESC_F_NEXT, 0)
    q.publish(0)


def _huge_len(q: MockQueue, mem: MockMemory) -> None:
    q.write_desc(0, mem.alloc(16), 16, C.DESC_F_NEXT, 1)
    q.write_desc(1, mem.alloc(16), 0xFFFFFFFF, 0, 0)
    q.publish(0)


def _head_out_of_range(q: MockQueue, mem: MockMemory) -> None:
    q.publish(200)


def _readable_after_writable(q: MockQueue, mem: MockMemory) -> None:
    q.write_desc(0, mem.alloc(16), 16, C.DESC_F_NEXT | C.DESC_F_WRITE, 1)
    q.write_desc(1, mem.alloc(16), 16, 0, 0)
    q.publish(0)


def _indirect_outside_memory(q: MockQueue, mem: MockMemory) -> None:
    q.write_desc(0, OUTSIDE, 32, C.DESC_F_INDIRECT, 0)
    q.publish(0)


def _indirect_not_negotiated(q: MockQueue, mem: MockMemory) -> None:
    q.write_desc(0, mem.alloc(32), 32, C.DESC_F_INDIRECT, 0)
    q.publish(0)


def _avail_idx_jump(q: MockQueue, mem: MockMemory) -> None:
    q.set_avail_idx(100)


GARBAGE = [
    (_next_out_of_range, DEFAULT_FEATURES, "next 99 out of range (table of 8)"),
    (_loop, DEFAULT_FEATURES, "descriptor loop or chain longer than 8"),
    (_huge_len, DEFAULT_FEATURES, "chain length exceeds 2^32 - 1"),
    (_head_out_of_range, DEFAULT_FEATURES, "head index 200 out of range (size 8)"),
    (_readable_after_writable, DEFAULT_FEATURES, "device-readable descriptor after writable"),
    (_indirect_outside_memory, INDIRECT, "buffer not mappable: DMA fault at iova 0x7f000000"),
    (_indirect_not_negotiated, DEFAULT_FEATURES,
     "INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC"),
    (_avail_idx_jump, DEFAULT_FEATURES, "avail idx jumped to 100 with 0 consumed (size 8)"),
]


@pytest.mark.parametrize(("garble", "features", "reason"), GARBAGE,
                         ids=[g[0].__name__.strip("_") for g in GARBAGE])
def test_garbage_ring_dump_is_bounded_and_says_what_the_data_path_says(
    box_factory: Callable[..., Box], caplog: pytest.LogCaptureFixture,
    garble: Callable[[MockQueue, MockMemory], None], features: int, reason: str,
) -> None:
    b = box_factory(features=features)
    garble(b.tx, b.driver.mem)
    reply = b.ask("dump-queue", queue=1)
    assert reply["ok"] is True, reply
    d = reply["dump"]
    errors = [d.get("error", "")] + [c.get("error", "") for c in d["in_flight"]]
    assert any(reason in e for e in errors), errors
    assert len(d["in_flight"]) <= 8 and len(d["descriptors"]) == 8
    assert sum(len(c["descriptors"]) for c in d["in_flight"]) <= 8 * DUMP_BUDGET_PER_DESCRIPTOR
    assert len(json.dumps(reply)) < 16 << 10
    # Looking changed nothing: the queue is neither broken nor counted as in error.
    assert not b.device.tx.broken and b.queue_stats("tx0")["errors"] == 0
    # The data path, on the same ring, breaks the queue for the same reason.
    with caplog.at_level(logging.ERROR, logger="harness.virtio"):
        b.tx.kick()
        b.device.process()
    assert b.device.status & C.STATUS_NEEDS_RESET
    assert f"queue tx0: {reason}" in caplog.text


def test_every_head_into_one_loop_stays_within_the_budget(box: Box) -> None:
    buf = box.driver.mem.alloc(16)
    for i in range(8):
        box.tx.write_desc(i, buf, 16, C.DESC_F_NEXT, (i + 1) % 8)
    for _ in range(8):
        box.tx.publish(3)
    d = box.dump(1)
    chains = d["in_flight"]
    assert len(chains) == 8
    assert sum(len(c["descriptors"]) for c in chains) == 8 * DUMP_BUDGET_PER_DESCRIPTOR
    assert "descriptor loop" in chains[0]["error"]
    assert "budget" in chains[-1]["error"]


def test_rings_outside_memory_give_an_error_field(box_factory: Callable[..., Box]) -> None:
    b = box_factory(init=False)
    drv = b.driver
    assert drv.negotiate()
    drv.write(C.COMMON_Q_SELECT, 2, 1)
    drv.write(C.COMMON_Q_SIZE, 2, 8)
    for off in (C.COMMON_Q_DESCLO, C.COMMON_Q_AVAILLO, C.COMMON_Q_USEDLO):
        drv.write(off, 4, OUTSIDE)
    drv.write(C.COMMON_Q_ENABLE, 2, 1)
    assert b.device.tx.broken
    d = b.dump(1)
    assert d["error"] == "rings not mapped: the queue is broken"
    assert d["addresses"]["desc"] == OUTSIDE and "descriptors" not in d


@pytest.mark.parametrize(
    ("request_args", "error"),
    [
        ({}, 'needs "queue"'),
        ({"queue": "1"}, '"queue" must be an integer, not string'),
        ({"queue": 1.0}, '"queue" must be an integer, not number'),
        ({"queue": True}, '"queue" must be an integer, not boolean'),
        ({"queue": None}, '"queue" must be an integer, not null'),
        ({"queue": -1}, "no queue -1 (queues: 0 rx0, 1 tx0)"),
        ({"queue": 2}, "no queue 2"),
        ({"queue": 10**40}, "no queue 1000"),
    ],
)
def test_dump_queue_refuses_bad_arguments(box: Box, request_args: dict[str, object],
                                          error: str) -> None:
    reply = box.ask("dump-queue", **request_args)
    assert reply["ok"] is False and error in reply["error"], reply
    assert box.ask("ping") == {"ok": True}  # the connection's server is still fine


def test_dump_queue_of_a_queue_not_enabled(box: Box) -> None:
    box.driver.reset()
    reply = box.ask("dump-queue", queue=0)
    assert reply == {"ok": False, "error": "queue 0 (rx0) is not enabled"}


def test_a_number_beyond_int_digits_is_a_request_error(box: Box) -> None:
    path = str(box.served.path)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b'{"cmd": "dump-queue", "queue": ' + b"9" * 5000 + b"}\n")
        reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"] is False and reply["error"].startswith("request is not JSON")


# ---- stats counters after known traffic ---------------------------------------------------


def test_stats_count_n_tx_frames(box: Box) -> None:
    n = 4  # two descriptors each: the queue of 8 is full
    frames = [HDR + bytes([i]) * (60 + i) for i in range(n)]
    for f in frames:
        box.tx.add([f[:12], f[12:]])
    box.tx.kick()
    box.device.process()
    assert len(box.backend.tx) == n
    tx = box.queue_stats("tx0")
    assert tx["chains"] == tx["packets"] == n
    assert tx["bytes"] == sum(len(f) - 12 for f in frames)
    assert tx["avail_idx"] == tx["last_avail"] == tx["used_idx"] == n
    assert (tx["kicks"], tx["interrupts"], tx["interrupts_suppressed"]) == (1, 1, 0)
    assert (tx["drops"], tx["errors"]) == (0, 0)
    ledger = box.stats()["stats"]["ledger"]
    # 3 ring mappings per queue, then one per descriptor: 2 per frame, all unmapped again.
    assert ledger["maps"] == 6 + 2 * n and ledger["unmaps"] == 2 * n and ledger["live"] == 6
    assert ledger["iova_space"]["regions"] == 1


def test_event_idx_suppression_is_counted(box: Box) -> None:
    box.tx.set_used_event(100)  # the driver wants no interrupt before used idx 101
    for i in range(3):
        box.tx.add([HDR + bytes([i]) * 60])
    box.tx.kick()
    box.device.process()
    tx = box.queue_stats("tx0")
    assert (tx["chains"], tx["interrupts"], tx["interrupts_suppressed"]) == (3, 0, 1)
    assert box.irq.vectors == []


def test_no_interrupt_flag_suppression_is_counted(box_factory: Callable[..., Box]) -> None:
    b = box_factory()
    b.driver.init(NO_EVENT_IDX)
    b.tx.set_avail_flags(C.AVAIL_F_NO_INTERRUPT)
    for i in range(4):
        b.tx.add([HDR + bytes([i]) * 60])
        b.tx.kick()
        b.device.process()
    tx = b.queue_stats("tx0")
    assert (tx["chains"], tx["interrupts"], tx["interrupts_suppressed"]) == (4, 0, 4)
