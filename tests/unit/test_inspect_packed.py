"""`harness dump-queue` on a packed ring: the view rendered from the dump of a real
PackedVirtqueue that the driver-side mock (harness.testing.mockpacked) drove through wraps, an
indirect chain, a popped chain and event suppression, checked against what the mock wrote."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import inspect
from harness.inspect_dump import render_dump
from harness.inspect_format import WIDTH
from harness.inspect_packed import owner
from harness.testing.mockpacked import MockPackedQueue
from harness.virtio import constants as C
from tests.unit.test_inspect import Box, make_box
from tests.unit.test_packed import HDR, PACKED

TX = 1


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = make_box(tmp_path, queue_size=8, features=PACKED)
    yield b
    b.served.close()


def txq(b: Box) -> MockPackedQueue:
    q = b.driver.queues[TX]
    assert isinstance(q, MockPackedQueue)
    return q


def wrap_twice(b: Box) -> None:
    """Nine two-descriptor chains sent and returned on an 8-slot ring: two laps and 2 more."""
    q = txq(b)
    for _ in range(3):
        for j in range(3):
            q.add([HDR, b"y" * (40 + j)])
        q.kick()
        b.device.process()
        assert len(q.get_used()) == 3


def view(b: Box) -> tuple[dict[str, Any], str]:
    dump = b.dump(TX)
    text = render_dump(dump)
    assert all(len(line) <= WIDTH for line in text.splitlines()), text
    return dump, text


def ring_rows(text: str) -> dict[int, str]:
    """Descriptor ring rows by slot: the owner column (and the next marker)."""
    rows: dict[int, str] = {}
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("  descriptor ring:"))
    for line in lines[start + 2:]:
        parts = line.split(None, 7)
        rows[int(parts[0])] = parts[7]
    return rows


def test_wrapped_ring_owners_next_position_and_wrap(box: Box) -> None:
    wrap_twice(box)
    q = txq(box)
    q.add([HDR, b"q" * 20])  # available at slots 2, 3 (id reused) on the device's lap
    dump, text = view(box)
    assert dump["format"] == "packed"
    assert (q.next_avail, q.avail_wrap) == (4, 1)  # 18 + 2 descriptors: lap 3 (wrap 1)
    assert "tx0): packed size 8" in text
    assert "next pos 2 wrap 1" in text and "used published pos 2 wrap 1" in text
    rows = ring_rows(text)
    # each slot decoded from what the mock wrote there, independently of the device's code
    assert rows[0] == "used w1"  # the last lap's used element of the chain at 0-1
    assert rows[1] == "driver w1"  # that chain's second descriptor: read past
    assert rows[2] == "device avail w1 <- next"
    assert rows[3] == "device avail w1"
    assert rows[4] == "used w0" and rows[5] == "driver w0"  # the lap before
    for slot in range(8):
        flags = q.read_desc(slot)[3]
        a, u = bool(flags & C.DESC_F_AVAIL), bool(flags & C.DESC_F_USED)
        assert (a == u) == rows[slot].startswith("used"), (slot, flags)
    assert "available from next: 1 chains" in text and "slot 2 id " in text


def test_indirect_chain_lists_its_table(box: Box) -> None:
    wrap_twice(box)
    txq(box).add_indirect([HDR, b"z" * 30])
    dump, text = view(box)
    (chain,) = dump["in_flight"]
    assert chain["read_len"] == 42 and [d["len"] for d in chain["descriptors"]] == [32, 12, 30]
    assert "INDIRECT" in text and "[i0] " in text and "len 12" in text
    assert "[i1] " in text and "len 30" in text and "42 B out, 0 B in" in text


def test_event_suppression_both_structures_decoded(box: Box) -> None:
    wrap_twice(box)
    q = txq(box)
    q.set_driver_event(C.RING_EVENT_FLAGS_DESC, 5 | 1 << 15)
    _, text = view(box)
    assert "drv evt  flags DESC, off_wrap 0x8005 = pos 5 wrap 1" in text
    off_wrap, flags = q.device_event()[0], q.device_event()[1]
    names = {0: "ENABLE", 1: "DISABLE", 2: "DESC"}
    pos, w = off_wrap & 0x7FFF, off_wrap >> 15
    assert f"dev evt  flags {names[flags]}, off_wrap {off_wrap:#x} = pos {pos} wrap {w}" in text
    q.set_driver_event(C.RING_EVENT_FLAGS_DISABLE)
    _, text = view(box)
    assert "drv evt  flags DISABLE, off_wrap 0x0 = pos 0 wrap 0" in text
    q.set_driver_event(3, 0x1234)
    _, text = view(box)
    assert "flags reserved 0x3, off_wrap 0x1234 = pos 4660 wrap 0" in text


def test_popped_chain_owned_by_the_device(box: Box) -> None:
    wrap_twice(box)
    bid = txq(box).add([HDR, b"p" * 10])
    chain = box.device.queues[TX].pop()
    assert chain is not None
    _, text = view(box)
    assert f"popped   id {bid} at pos 2 wrap 1" in text and "1 chains popped" in text
    rows = ring_rows(text)
    assert rows[2] == "device popped w1" and rows[4].startswith("used")
    assert "available from next: 0 chains" in text


def test_json_reply_says_the_format(box: Box, tmp_path: Path) -> None:
    reply = box.ask("dump-queue", queue=TX)
    assert json.loads(json.dumps(reply))["dump"]["format"] == "packed"
    (tmp_path / "split").mkdir()
    split = make_box(tmp_path / "split", queue_size=8)
    try:
        assert split.dump(TX)["format"] == "split"
        assert "tx0): split size 8" in render_dump(split.dump(TX))
    finally:
        split.served.close()


@pytest.mark.parametrize("odd", [
    {"format": "packed"},
    {"format": "packed", "device": {"last_avail": "x", "popped": {"1": None}},
     "descriptors": [1, None, {"flags": "a", "addr": -1}], "driver_event": [],
     "device_event": {"flags": 99, "off_wrap": -5}, "in_flight": [None, {"descriptors": 3}]},
])  # fmt: skip
def test_odd_packed_dump_renders_without_a_traceback(odd: dict[str, Any]) -> None:
    text = render_dump(odd)
    assert all(len(line) <= WIDTH for line in text.splitlines())


def test_owner_against_both_wrap_counters() -> None:
    avail1, used1 = C.DESC_F_AVAIL, C.DESC_F_AVAIL | C.DESC_F_USED
    assert owner(5, avail1, 2, 1, frozenset()) == "device avail w1"  # ahead, this lap
    assert owner(1, avail1, 2, 1, frozenset()) == "driver w1"  # behind: read past
    assert owner(1, avail1, 2, 1, frozenset({1})) == "device popped w1"
    assert owner(1, C.DESC_F_USED, 2, 1, frozenset()) == "device avail w0"  # next lap
    assert owner(3, used1, 2, 1, frozenset()) == "used w1"


def test_stats_table_shows_packed_positions_with_their_wrap_counter(box: Box) -> None:
    wrap_twice(box)  # 18 descriptors on 8 slots: position 2, wrap counter 1 (raw 32770)
    text = inspect.render_stats(box.stats())
    row = next(line for line in text.splitlines() if line.startswith("tx0"))
    assert row.split()[1:3] == ["2w1", "2w1"], text
    assert all(len(line) <= WIDTH for line in text.splitlines())
