"""IovaDomain: the series' KUnit cases (aligned, fragmented, random stress) and the kernel's
semantics: limits, lookup, reservation, max32 shortcut, range caches, teardown."""

from __future__ import annotations

import random

import pytest

from harness.dma.iova import Iova, IovaDomain, IovaNotFoundError, IovaStateError
from harness.dma.iova_cache import IOVA_MAG_SIZE, MAX_GLOBAL_MAGS
from harness.testing.iova_strategies import IovaModel

G = 4096
L32 = (1 << 20) - 1  # last 32-bit pfn with 4 KiB pages
L64 = (1 << 36) - 1


def test_alloc_top_down_below_limit() -> None:
    d = IovaDomain(G, 1)
    a = d.alloc_iova(4, L32)
    b = d.alloc_iova(1, L32)
    assert a is not None and b is not None
    assert (a.pfn_lo, a.pfn_hi) == (L32 - 3, L32)
    assert (b.pfn_lo, b.pfn_hi) == (L32 - 4, L32 - 4)
    c = d.alloc_iova(2, 100)
    assert c is not None and c.pfn_hi == 100
    d.check()


def test_alloc_aligned() -> None:
    """KUnit iova_test_alloc_aligned: size-aligned starts for every size, highest first."""
    d = IovaDomain(G, 1)
    for size in range(1, 70):
        iova = d.alloc_iova(size, L32, size_aligned=True)
        assert iova is not None
        align = 1 << (size - 1).bit_length()
        assert iova.pfn_lo % align == 0, (size, iova)
        assert iova.size == size
    d.check()


def test_alignment_cap() -> None:
    d = IovaDomain(G, 1, max_align_shift=2)
    d.alloc_iova(1, L32)  # makes the top unaligned
    iova = d.alloc_iova(64, L32, size_aligned=True)
    assert iova is not None and iova.pfn_lo % 4 == 0 and iova.pfn_lo % 64 != 0


def test_fragmented_space() -> None:
    """KUnit iova_test_fragmented: one-page holes never satisfy size 2, and the size-2 request
    still finds the space below them (no false full)."""
    d = IovaDomain(G, 1)
    pages = [d.alloc_iova(1, L32) for _ in range(2001)]
    for p in pages[1::2]:
        assert p is not None
        d.free_iova(p.pfn_lo)
    lowest = min(p.pfn_lo for p in pages if p is not None)
    for _ in range(50):
        iova = d.alloc_iova(2, L32, size_aligned=True)
        assert iova is not None and iova.pfn_hi < lowest and iova.pfn_lo % 2 == 0
    for _ in range(1000):  # the holes are still usable by single pages
        one = d.alloc_iova(1, L32)
        assert one is not None and one.pfn_lo > lowest
    d.check()


def test_fragmented_exact_fit_only_no_false_full() -> None:
    """Everything full except scattered holes: a fitting hole is always found."""
    d = IovaDomain(G, 0)
    top = 255
    d.reserve_iova(0, top)
    model = IovaModel(top + 1)
    model.reserve(0, top)
    rng = random.Random(7)
    for _ in range(30):
        lo = rng.randrange(0, top - 8)
        hi = lo + rng.randrange(0, 6)
        for pfn in range(lo, hi + 1):
            iova = d.find_iova(pfn)
            if iova is not None:
                d.free_iova(pfn)
                model.release(iova.pfn_lo, iova.pfn_hi)
        for size in (1, 2, 3, 4, 5, 8):
            for aligned in (False, True):
                align = 1 << (size - 1).bit_length() if aligned else 1
                want = model.highest_fit(size, top, align)
                got = d.alloc_iova(size, top, aligned)
                assert (got.pfn_lo if got else None) == want
                if got:
                    model.take(got.pfn_lo, got.pfn_hi)
    d.check()


def test_random_stress() -> None:
    """KUnit iova_test_random_stress: random sizes, limits and frees against the model."""
    rng = random.Random(3)
    top = 1 << 12
    d = IovaDomain(G, 1)
    model = IovaModel(top, 1)
    live: list[Iova] = []
    for step in range(4000):
        if live and rng.random() < 0.45:
            iova = live.pop(rng.randrange(len(live)))
            d.free_iova(rng.randint(iova.pfn_lo, iova.pfn_hi))
            model.release(iova.pfn_lo, iova.pfn_hi)
        else:
            size = rng.choice([1, 1, 2, 3, 4, 7, 8, 16, 33])
            limit = rng.choice([top - 1, rng.randrange(top)])
            aligned = rng.random() < 0.5
            align = 1 << (size - 1).bit_length() if aligned else 1
            got = d.alloc_iova(size, limit, aligned)
            assert (got.pfn_lo if got else None) == model.highest_fit(size, limit, align), step
            if got:
                model.take(got.pfn_lo, got.pfn_hi)
                live.append(got)
        if step % 500 == 0:
            d.check()
            assert d.allocated_pfns == model.allocated()
    d.check()


def test_limit_below_start_and_huge_sizes_fail() -> None:
    d = IovaDomain(G, 16)
    assert d.alloc_iova(1, 15) is None
    assert d.alloc_iova(1 << 40, L32) is None
    with pytest.raises(ValueError):
        d.alloc_iova(0, L32)


def test_find_iova_contains() -> None:
    d = IovaDomain(G, 1)
    a = d.alloc_iova(8, L32, payload="view")
    assert a is not None
    for pfn in range(a.pfn_lo, a.pfn_hi + 1):
        assert d.find_iova(pfn) is a
    assert d.find_iova(a.pfn_lo - 1) is None
    assert d.find_iova(a.pfn_hi + 1) is None
    assert a.payload == "view"


def test_free_unknown_raises() -> None:
    d = IovaDomain(G, 1)
    a = d.alloc_iova(1, L32)
    assert a is not None
    d.free_iova(a.pfn_lo)
    with pytest.raises(IovaNotFoundError):
        d.free_iova(a.pfn_lo)


def test_reserve_iova() -> None:
    d = IovaDomain(G, 1)
    a = d.alloc_iova(4, 103)  # [100, 103]
    assert a is not None and a.pfn_lo == 100
    r = d.reserve_iova(90, 110)
    assert r is not None and r.pfn_hi == 110
    assert d.find_iova(100) is a and a.size == 4  # existing entry untouched
    for pfn in range(90, 111):
        assert d.find_iova(pfn) is not None
    assert d.reserve_iova(95, 96) is d.find_iova(96)  # already covered
    got = d.alloc_iova(1, 110)
    assert got is not None and got.pfn_lo == 89
    d.check()


def test_max32_shortcut_and_reset() -> None:
    d = IovaDomain(G, 1)
    d.reserve_iova(1, L32 - 10)
    assert d.alloc_iova(16, L32) is None
    assert d.max32_alloc_size == 16
    assert d.alloc_iova(20, L32 - 5) is None and d.stats["max32_shortcut"] == 1
    assert d.alloc_iova(8, L32) is not None  # smaller sizes still searched
    last = d.alloc_iova(2, L32)
    assert last is not None
    d.free_iova(last.pfn_lo)
    assert d.max32_alloc_size == d.dma_32bit_pfn  # a free below 4 GiB re-opens the space
    # (start_pfn 1: the first size that cannot fit at all is dma_32bit_pfn, as in the kernel)


def test_max32_narrow_limit_failure_does_not_arm() -> None:
    """A failure under a 24-bit limit says nothing about the rest of the 32-bit space."""
    d = IovaDomain(G, 1)
    d.reserve_iova(1, 0xFFF)
    assert d.alloc_iova(4, 0xFFF) is None
    assert d.max32_alloc_size == d.dma_32bit_pfn
    assert d.alloc_iova(4, L32) is not None


def test_max32_aligned_failure_does_not_block_unaligned() -> None:
    d = IovaDomain(G, 1)
    d.reserve_iova(1, L32 - 4)
    d.reserve_iova(L32, L32)  # one 3-pfn hole [L32-3, L32-1] remains
    assert d.alloc_iova(4, L32, size_aligned=True) is None
    assert d.max32_aligned_size == 4
    assert d.alloc_iova(3, L32) is not None


def test_max32_transient_failure_regression() -> None:
    """Regression (v3 review, "iova32_full reached because GFP_ATOMIC failed"): a failed node
    allocation must not make the 32-bit space look permanently full."""
    from harness.dma.iova_faults import INSERT, FailureInjector

    inj = FailureInjector()
    d = IovaDomain(G, 1, node_alloc=inj)
    inj.fail_next(1, INSERT)
    assert d.alloc_iova(1, L32) is None
    assert d.stats["nomem"] == 1
    assert d.max32_alloc_size == d.dma_32bit_pfn
    # Nothing was freed in between, yet the same request must now succeed.
    assert d.alloc_iova(1, L32) is not None
    assert d.alloc_iova_fast(1, L32) is not None


def test_rcache_reuse_and_limit() -> None:
    d = IovaDomain(G, 1)
    pfn = d.alloc_iova_fast(3, L64)  # rounded to 4, aligned
    assert pfn is not None and pfn % 4 == 0 and d.find_iova(pfn + 3) is not None
    d.free_iova_fast(pfn, 3)
    assert d.find_iova(pfn) is not None  # parked in the cache, still allocated
    assert d.alloc_iova_fast(4, L32) != pfn  # cached one lies above this limit
    assert d.alloc_iova_fast(4, L64) == pfn
    big = d.alloc_iova_fast(100, L64)
    assert big is not None
    d.free_iova_fast(big, 100)  # not cacheable: freed in the tree
    assert d.find_iova(big) is None
    d.check()


def test_rcache_flush_and_retry() -> None:
    """When the tree is full, alloc_iova_fast flushes the caches and retries once."""
    d = IovaDomain(G, 1)
    d.reserve_iova(1, 63)
    pfns = [d.alloc_iova_fast(1, 127) for _ in range(64)]
    assert all(p is not None for p in pfns) and d.alloc_iova(1, 127) is None
    for p in pfns:
        assert p is not None
        d.free_iova_fast(p, 1)
    # Cached order-0 pfns cannot serve size 2: only a flush frees space for it.
    assert d.alloc_iova_fast(2, 127, flush_rcache=False) is None
    got = d.alloc_iova_fast(2, 127)
    assert got is not None and d.stats["cache_flushes"] == 1
    assert d.rcache.cached() == []
    d.check()


def test_rcache_magazines_depot_overflow() -> None:
    d = IovaDomain(G, 1)
    n = IOVA_MAG_SIZE * (MAX_GLOBAL_MAGS + 3)
    pfns = [d.alloc_iova_fast(1, L64) for _ in range(n)]
    for p in pfns:
        assert p is not None
        d.free_iova_fast(p, 1)
    cached = len(d.rcache.cached())
    assert cached <= IOVA_MAG_SIZE * (MAX_GLOBAL_MAGS + 2)
    assert len(d) == cached  # the overflow went back to the tree
    d.check()
    d.free_cpu_cached_iovas(0)
    d.flush_rcaches()
    assert len(d) == 0


def test_per_cpu_caches() -> None:
    d = IovaDomain(G, 1, ncpus=2)
    p = d.alloc_iova_fast(1, L64, cpu=1)
    assert p is not None
    d.free_iova_fast(p, 1, cpu=1)
    assert d.alloc_iova_fast(1, L64, cpu=0) != p
    assert d.alloc_iova_fast(1, L64, cpu=1) == p


def test_put_iova_domain_releases_each_once() -> None:
    released: list[Iova] = []
    d = IovaDomain(G, 1, on_release=released.append)
    live = [d.alloc_iova(2, L32) for _ in range(100)]
    d.free_iova(live[0].pfn_lo)  # type: ignore[union-attr]
    p = d.alloc_iova_fast(1, L32)
    assert p is not None
    d.free_iova_fast(p, 1)
    d.put_iova_domain()
    assert len(released) == 101 and len({id(i) for i in released}) == 101
    with pytest.raises(IovaStateError):
        d.alloc_iova(1, L32)
