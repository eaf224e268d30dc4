"""RangeTree: gap search against brute force, lookups, and structure through splits/merges."""

from __future__ import annotations

import random

import pytest

from harness.dma import rangetree
from harness.dma.rangetree import Iova, RangeTree, TreeCorruption


def _brute(live: list[Iova], size: int, limit: int, floor: int, align: int, top: int) -> int | None:
    best = None
    prev = -1
    for lo, hi in [*sorted((e.pfn_lo, e.pfn_hi) for e in live), (top, top)]:
        a, b = max(prev + 1, floor), min(lo - 1, limit)
        s = (b - size + 1) & -align
        if b - a + 1 >= size and s >= a and (best is None or s > best):
            best = s
        prev = hi
    return best


@pytest.mark.parametrize("seed", range(40))
def test_find_gap_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    top = rng.choice([64, 1000, 20000])
    t = RangeTree(top)
    live: list[Iova] = []
    for step in range(600):
        if live and rng.random() < 0.4:
            t.erase(live.pop(rng.randrange(len(live))))
        else:
            size, limit = rng.randint(1, 8), rng.randrange(top)
            floor, align = rng.randint(0, 5), rng.choice([1, 1, 2, 4, 8])
            found = t.find_gap(size, limit, floor, -align)
            assert (found[2] if found else None) == _brute(live, size, limit, floor, align, top)
            if found:
                e = Iova(found[2], found[2] + size - 1)
                t.insert_at(found[0], found[1], e)
                live.append(e)
        if step % 50 == 0:
            t.check()
        p = rng.randrange(top)
        hit = [e for e in live if e.pfn_lo <= p <= e.pfn_hi]
        assert t.find(p) is (hit[0] if hit else None)
    t.check()


def test_deep_tree_grows_and_shrinks() -> None:
    rng = random.Random(1)
    t = RangeTree(1 << 40)
    live = []
    for _ in range(20000):
        found = t.find_gap(1, (1 << 32) - 1, 1, -1)
        assert found is not None
        e = Iova(found[2], found[2])
        t.insert_at(found[0], found[1], e)
        live.append(e)
    assert t.height >= 2
    t.check()
    rng.shuffle(live)
    for k, e in enumerate(live):
        t.erase(e)
        if k % 2500 == 0:
            t.check()
    assert len(t) == 0 and t.height == 0
    t.check()


def test_limit_on_domain_full_of_high_entries() -> None:
    """A low limit must skip the high entries by the index, not walk them."""
    t = RangeTree(1 << 40)
    for _ in range(5000):
        f = t.find_gap(1, (1 << 36) - 1, 1, -1)
        assert f is not None
        t.insert_at(f[0], f[1], Iova(f[2], f[2]))
    f = t.find_gap(4, (1 << 20) - 1, 1, -4)
    assert f is not None and f[2] == (1 << 20) - 4


def test_insert_outside_gap_rejected() -> None:
    t = RangeTree(100)
    f = t.find_gap(10, 99, 0, -1)
    assert f is not None
    with pytest.raises(ValueError):
        t.insert_at(f[0], f[1], Iova(95, 105))
    with pytest.raises(KeyError):
        t.erase(Iova(1, 1))


@pytest.mark.parametrize("seed", range(4))
def test_find_gap_deep_tree_aligned_and_floor(seed: int) -> None:
    """Misaligned and below-floor gaps in a tree of height >= 2 make the search backtrack
    across levels; it must still find exactly the brute-force answer."""
    rng = random.Random(seed)
    top = 1 << 15
    t = RangeTree(top)
    live: list[Iova] = []
    for _ in range(12000):
        f = t.find_gap(1, rng.randrange(top), 0, -1)
        if f is not None:
            e = Iova(f[2], f[2])
            t.insert_at(f[0], f[1], e)
            live.append(e)
    rng.shuffle(live)
    for e in live[: len(live) // 3]:
        t.erase(e)
    live = live[len(live) // 3 :]
    assert t.height >= 2
    t.check()
    for _ in range(150):
        size, limit = rng.randint(1, 6), rng.randrange(top)
        floor, align = rng.randrange(top // 2), rng.choice([1, 2, 4, 8, 16])
        found = t.find_gap(size, limit, floor, -align)
        assert (found[2] if found else None) == _brute(live, size, limit, floor, align, top)


@pytest.fixture
def small_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny fan-outs, so a few hundred entries give a deep tree with frequent splits/merges."""
    monkeypatch.setattr(rangetree, "LEAF_MAX", 8)
    monkeypatch.setattr(rangetree, "NODE_MAX", 4)
    monkeypatch.setattr(rangetree, "_LEAF_MIN", 2)
    monkeypatch.setattr(rangetree, "_NODE_MIN", 1)


def _remove(t: RangeTree, pfn: int) -> Iova | None:
    """Erase the entry containing pfn, as IovaDomain.free_iova does; None if there is none."""
    path, i, found = t.locate_entry(pfn)
    if found is not None:
        t.erase_at(path, i)
    return found


@pytest.mark.parametrize("seed", range(12))
def test_remove_and_top_gap_match_brute_force(seed: int, small_nodes: None) -> None:
    """Removal by pfn (the domain's free path) and the top gap kept outside the tree:
    allocations above the highest entry, frees of the highest entry and of entries first in
    their leaves, checked against brute force and check() throughout."""
    rng = random.Random(seed)
    top = 3000
    t = RangeTree(top)
    live: list[Iova] = []
    for step in range(1500):
        r = rng.random()
        if live and r < 0.45:
            e = live.pop(rng.randrange(len(live)) if rng.random() < 0.7 else -1)
            p = rng.randint(e.pfn_lo, e.pfn_hi)
            assert _remove(t, p) is e
            assert _remove(t, p) is None
        elif r < 0.5:
            p = rng.randrange(-3, top + 2)
            hit = [e for e in live if e.pfn_lo <= p <= e.pfn_hi]
            _path, _i, found = t.locate_entry(p)
            assert found is (hit[0] if hit else None)
            if found is None:
                assert _remove(t, p) is None
        else:
            size = rng.randint(1, 5)
            limit = rng.choice([top - 1, top + 10, rng.randrange(top)])
            align = rng.choice([1, 1, 2, 4])
            found_gap = t.find_gap(size, limit, 0, -align)
            expect = _brute(live, size, min(limit, top - 1), 0, align, top)
            assert (found_gap[2] if found_gap else None) == expect
            if found_gap:
                s = found_gap[2]
                e = Iova(s, s if size == 1 else s + size - 1)
                t.insert_at(found_gap[0], found_gap[1], e)
                live.append(e)
        live.sort(key=lambda e: e.pfn_lo)
        if step % 25 == 0:
            t.check()
            # gap_above() of the highest entry reports the real free space up to the anchor.
            path, j = t.locate(top - 1)
            first, last = t.gap_above(path, j)
            assert last == top - 1 and first == (live[-1].pfn_hi + 1 if live else 0)
    assert t.height >= 2 or len(live) < 8
    t.check()


def test_check_catches_top_gap_and_key_types() -> None:
    t = RangeTree(1 << 30)
    for _ in range(3000):
        f = t.find_gap(1, (1 << 20) - 1, 0, -1)
        assert f is not None
        t.insert_at(f[0], f[1], Iova(f[2], f[2]))
    assert t.height >= 1
    t.check()
    root = t._root
    keys = root.keys
    root.keys = list(keys)
    with pytest.raises(TreeCorruption):
        t.check()
    root.keys = keys
    t.check()
    t._topgap += 1
    with pytest.raises(TreeCorruption):
        t.check()


def test_anchor_key_wider_than_int64(small_nodes: None) -> None:
    """A 1-byte granule puts the anchor at 2**64: internal keys must still hold it."""
    top = 1 << 64
    t = RangeTree(top)
    live = []
    for k in range(200):
        f = t.find_gap(1, top - 1 - 5 * (k % 7), 0, -1)
        assert f is not None
        e = Iova(f[2], f[2])
        t.insert_at(f[0], f[1], e)
        live.append(e)
    assert t.height >= 2
    t.check()
    for e in live[::2]:
        assert _remove(t, e.pfn_lo) is e
    t.check()
