"""The C bursts' table of guest regions (harness.vfu.bursts.RegionTable) kept in step with
GuestMemory, one region at a time, and the bursts running over thousands of small regions as
behind a vIOMMU (every guest DMA mapping a region of its own).

The table against a sorted model under random inserts and removals (past its first capacity, so
it grows and moves); a device over many page-sized regions, added after the fast path was made,
sending chains that cross them in C with the same result as the Python path; and regions that
come and go between bursts never being reached through a stale row.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.testing.mockdriver import NetRig
from harness.vfu.bursts import RegionTable
from tests.unit.test_fastpath_tx import P, _chain, _data, _observe, _rig

MANY = 0x40_0000_0000  # where the page regions go: far from MockMemory's
PAGES = 300  # well past the table's first capacity (64)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 400)), max_size=600))
def test_the_table_matches_a_sorted_model(ops: list[tuple[bool, int]]) -> None:
    table = RegionTable()
    model: dict[int, tuple[int, int, int, bool]] = {}
    for add, page in ops:
        iova = page * P
        if add and iova not in model:
            row = (iova, iova + P - 1, 0x7F00_0000_0000 + page, bool(page & 1))
            table.insert(*row)
            model[iova] = row
        elif not add:
            assert table.remove(iova) == (iova in model)
            model.pop(iova, None)
        assert len(table) == len(model)
    assert table.rows() == [model[k] for k in sorted(model)]


def _pages(r: NetRig, first: int, count: int) -> None:
    """``count`` adjacent page regions from page ``first`` at MANY, each a pattern of its own."""
    for k in range(first, first + count):
        body = bytes((k * 13 + i) & 0xFF for i in range(P))
        r.driver.mem.memory.add_region(MANY + k * P, memoryview(bytearray(body)), writable=True)


def _post_across(r: NetRig, at: int) -> None:
    """Chains in the page regions: within one, across two, across five, mixed with the main
    region's data area."""
    _chain(r, [(MANY + 10 * P + 100, 64)])
    _chain(r, [(MANY + 20 * P - 30, 90)])
    _chain(r, [(MANY + 40 * P + 7, 4 * P + 3)])
    _chain(r, [(at, 12), (MANY + (PAGES - 1) * P, P)])


def _send(r: NetRig) -> dict[str, Any]:
    r.tx.kick()
    r.device.process()
    return _observe(r)


def test_chains_across_hundreds_of_page_regions_go_through_c() -> None:
    seen = []
    for on in (True, False):
        r = _rig(on)
        _pages(r, 0, PAGES)  # after the fast path was made: the watcher put each in the table
        _post_across(r, _data(r))
        seen.append(_send(r))
        if on:
            fast = r.device.fastpath
            assert fast is not None and fast.tx_chains == 4
    assert seen[0] == seen[1]
    frames = seen[0]["frames"]
    assert [len(f) for f in frames] == [64, 90, 4 * P + 3, 12 + P]


def test_regions_coming_and_going_between_bursts_are_never_reached_stale() -> None:
    """As under a vIOMMU: pages unmapped and others mapped between bursts. A chain into a page
    that is gone is the Python path's to refuse; one into a page mapped since goes through C,
    after the table grew and moved under the queue's C state."""
    seen = []
    for on in (True, False):
        r = _rig(on)
        _pages(r, 0, PAGES)
        at = _data(r)
        _chain(r, [(MANY + 50 * P, 64)])
        first = _send(r)
        assert len(first["frames"]) == 1
        for k in range(0, PAGES, 2):  # every other page goes
            r.driver.mem.memory.remove_range(MANY + k * P, P)
        _pages(r, PAGES, 400)  # and new ones come, past the old end: the table grows (moves)
        _chain(r, [(MANY + 51 * P, 64)])  # still there
        _chain(r, [(MANY + (PAGES + 390) * P, 128)])  # mapped since
        _chain(r, [(at, 12), (MANY + 52 * P, 64)])  # gone: the queue breaks
        seen.append(_send(r))
        if on:
            fast = r.device.fastpath
            assert fast is not None and fast.tx_chains == 3
    assert seen[0] == seen[1]
    assert seen[0]["ledger"]["violations"]["unmapped_iova"] == 1
    assert [len(f) for f in seen[0]["frames"]] == [64, 128]  # since the first burst


def test_a_row_that_cannot_be_made_turns_the_bursts_off_not_the_dma_map(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The watcher runs inside the DMA_MAP callback: when a region's row cannot be made, the
    map still succeeds, the bursts stop for good, and the Python path sends every frame."""
    r = _rig(True)
    fast = r.device.fastpath
    assert fast is not None

    def broken(view: memoryview) -> int:
        raise MemoryError("no room for the row")

    fast.engine.address = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        _pages(r, 0, 3)
    assert len([x for x in caplog.records if "C bursts off" in x.message]) == 1  # not per map
    assert len(r.driver.mem.memory) >= 3 + 4  # every map went through
    assert not fast.tx_on and not fast.rx_on
    _chain(r, [(MANY + P, 64)])
    seen = _send(r)
    assert [len(f) for f in seen["frames"]] == [64] and fast.tx_chains == 0
    assert r.device.stats()["tx_fast_chains"] == -1
