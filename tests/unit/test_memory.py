"""GuestMemory: regions in its index (both kinds), lookup, overlap, range removal, revocation."""

from __future__ import annotations

import mmap
import random

import pytest

from harness.dma import Direction, DirectMapOps, DmaFault, DmaHandle, GuestMemory, RegionOverlap
from harness.dma.regionindex import INDEX_ENV

#: Every test here runs on both region indexes (conftest.index_kind).
pytestmark = pytest.mark.usefixtures("index_kind")

P = 0x1000


def _mem() -> tuple[GuestMemory, bytearray, bytearray]:
    a, b = bytearray(P), bytearray(2 * P)
    mem = GuestMemory()
    mem.add_region(0x10000, memoryview(b), writable=True)
    mem.add_region(0x0, memoryview(a), writable=False)
    return mem, a, b


def test_view_is_zero_copy_and_sorted() -> None:
    mem, a, b = _mem()
    assert mem.regions() == [(0x0, P, False), (0x10000, 2 * P, True)]
    v = mem.view(0x10010, 4, write=True)
    v[:] = b"abcd"
    assert b[0x10:0x14] == b"abcd"
    a[5] = 7
    assert mem.view(5, 1, write=False)[0] == 7
    mem.check()


@pytest.mark.parametrize(
    ("iova", "length", "write"),
    [
        (0x1000, 1, False),  # gap after the first region
        (0xFFF, 2, False),  # straddles the end of a region
        (0x11FFF, 2, True),
        (0x12000, 1, True),  # past the last region
        (0x0, 1, True),  # read-only region written
        (0x10000, -1, False),
        (-1, 1, False),
    ],
)
def test_view_faults(iova: int, length: int, write: bool) -> None:
    mem, _, _ = _mem()
    with pytest.raises(DmaFault) as e:
        mem.view(iova, length, write=write)
    assert e.value.iova == iova and not e.value.transient


def test_adjacent_regions_do_not_merge() -> None:
    mem = GuestMemory()
    mem.add_region(0, memoryview(bytearray(P)), writable=True)
    mem.add_region(P, memoryview(bytearray(P)), writable=True)
    with pytest.raises(DmaFault):
        mem.view(P - 8, 16, write=False)
    assert mem.contains(P - 8, 8) and not mem.contains(P - 8, 16)


@pytest.mark.parametrize(
    ("iova", "size"), [(0x0, P), (0x10000, P), (0xF000, 2 * P), (0x11000, 4 * P), (0, 1 << 20)]
)
def test_overlapping_add_raises(iova: int, size: int) -> None:
    mem, _, _ = _mem()
    with pytest.raises(RegionOverlap):
        mem.add_region(iova, memoryview(bytearray(size)), writable=True)
    assert len(mem) == 2
    mem.check()


@pytest.mark.parametrize(("iova", "size"), [(0x10, P), (0, 0x10), (0, 0), (-P, P)])
def test_unaligned_or_empty_region_rejected(iova: int, size: int) -> None:
    with pytest.raises(ValueError):
        GuestMemory().add_region(iova, memoryview(bytearray(size)), writable=True)


def test_unmappable_region_occupies_iovas() -> None:
    mem = GuestMemory()
    mem.add_region(0x100000, None, writable=False, size=0x10000)
    assert mem.regions() == [(0x100000, 0x10000, False)]
    with pytest.raises(DmaFault):
        mem.view(0x100000, 1, write=False)
    with pytest.raises(RegionOverlap):
        mem.add_region(0x108000, memoryview(bytearray(P)), writable=True)
    with pytest.raises(ValueError):
        mem.add_region(0x200000, None, writable=False)  # no view and no size


def test_remove_range_removes_only_regions_fully_inside() -> None:
    mem = GuestMemory()
    for i in range(8):
        mem.add_region(i * P, memoryview(bytearray(P)), writable=True)
    # [0x1800, 0x5000) holds pages 2, 3 and 4 fully; page 1 straddles the start.
    assert mem.remove_range(0x1800, 0x3800) == [(0x2000, P), (0x3000, P), (0x4000, P)]
    assert [r[0] for r in mem.regions()] == [0x0, 0x1000, 0x5000, 0x6000, 0x7000]
    assert mem.remove_range(0x100000, P) == []
    mem.check()
    assert mem.remove_range(0, 1 << 64) == [(i * P, P) for i in (0, 1, 5, 6, 7)]
    assert len(mem) == 0 and mem.mapped_bytes == 0
    mem.add_region(0x2000, memoryview(bytearray(P)), writable=True)  # space is free again
    mem.check()


def test_many_regions_lookup_and_fragmentation() -> None:
    mem = GuestMemory()
    # Every other page mapped in [0, 4 MiB): the free space is shredded into 512 holes.
    for i in range(0, 1024, 2):
        mem.add_region(i * P, memoryview(bytearray(P)), writable=True)
    for i in range(1024):
        assert (mem.lookup(i * P + 5) is not None) == (i % 2 == 0)
    f = mem.fragmentation()
    assert f["regions"] == 512 and f["mapped_bytes"] == 512 * P
    assert f["largest_free_below_4g"] == (1 << 32) - 1024 * P + P
    assert f["free_below_4g"] == (1 << 32) - 512 * P
    assert 0 < f["free_fragmentation"] < 0.01
    empty = GuestMemory().fragmentation()
    assert empty["free_fragmentation"] == 0.0 and empty["largest_free_below_4g"] == 1 << 32


def test_revocation_releases_every_view_of_a_real_mapping() -> None:
    mm = mmap.mmap(-1, 4 * P)
    mem = GuestMemory()
    mem.add_region(0x10000, memoryview(mm), writable=True)
    ops = DirectMapOps(mem)
    h = ops.map_page(0x10100, 64, Direction.FROM_DEVICE)
    r = ops.map_page(0x10200, 64, Direction.TO_DEVICE)
    h.view[:4] = b"abcd"
    assert mm[0x100:0x104] == b"abcd"
    revoked: list[DmaHandle] = []
    mem.on_revoke = revoked.append
    assert mem.remove_range(0x10000, 4 * P) == [(0x10000, 4 * P)]
    assert h.revoked and r.revoked and set(revoked) == {h, r}
    assert mem.revocations == 1 and mem.revoked_handles == 2
    # No view of the mapping is left anywhere: the host mapping can go (BufferError otherwise).
    mm.close()
    with pytest.raises(ValueError):
        h.view[0]  # loud, never a segfault
    ops.unmap_page(h, Direction.FROM_DEVICE)  # cleanup after revocation is harmless
    ops.unmap_page(r, Direction.TO_DEVICE)


def test_index_matches_a_brute_force_model(index_kind: str) -> None:
    """Random adds, removals and lookups against a plain list of regions: same answers, same
    refusals (overlap, a lookup just past a region's end, in a hole, before the first)."""
    rng = random.Random(7)
    mem = GuestMemory()
    assert mem.index_kind == index_kind
    model: dict[int, int] = {}  # iova -> size
    for _ in range(3000):
        op = rng.random()
        iova = rng.randrange(0, 256) * P
        if op < 0.45:
            size = rng.choice((P, P, 2 * P, 5 * P))
            clash = any(s < iova + size and iova < s + n for s, n in model.items())
            if clash:
                with pytest.raises(RegionOverlap):
                    mem.add_region(iova, None, writable=False, size=size)
            else:
                mem.add_region(iova, None, writable=False, size=size)
                model[iova] = size
        elif op < 0.7:
            size = rng.randrange(1, 8) * P
            want = sorted((s, n) for s, n in model.items() if iova <= s and s + n <= iova + size)
            assert mem.remove_range(iova, size) == want
            for s, _n in want:
                del model[s]
        else:
            probe = iova + rng.choice((0, 1, P - 1, P, 3 * P - 1))
            hit = [(s, n) for s, n in model.items() if s <= probe < s + n]
            region = mem.lookup(probe)
            assert (None if region is None else (region.iova, region.size)) == (
                hit[0] if hit else None
            )
    assert mem.regions() == [(s, n, False) for s, n in sorted(model.items())]
    mem.check()


def test_unknown_index_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INDEX_ENV, "btree")
    with pytest.raises(ValueError, match="HARNESS_GUEST_INDEX"):
        GuestMemory()
