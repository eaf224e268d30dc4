"""Deferred erase ("iova: defer maple tree erase on GFP_ATOMIC failure") and the fault hook."""

from __future__ import annotations

import pytest

from harness.dma.iova import Iova, IovaDomain, IovaNotFoundError
from harness.dma.iova_faults import ERASE, INSERT, FailureInjector

G = 4096
L32 = (1 << 20) - 1


def _domain() -> tuple[IovaDomain, FailureInjector, list[Iova]]:
    inj = FailureInjector()
    released: list[Iova] = []
    return IovaDomain(G, 1, node_alloc=inj, on_release=released.append), inj, released


def test_failed_erase_keeps_entry_and_address() -> None:
    d, inj, released = _domain()
    a = d.alloc_iova(4, L32)
    assert a is not None
    inj.fail_next(1, ERASE)
    d.free_iova(a.pfn_lo)
    assert d.deferred == [a] and released == []
    assert d.find_iova(a.pfn_lo) is None  # freed from the owner's view
    assert d.find_iova(a.pfn_lo, include_deferred=True) is a  # still in the tree
    b = d.alloc_iova(4, L32)
    assert b is not None and b.pfn_hi < a.pfn_lo  # the address is not reused
    with pytest.raises(IovaNotFoundError):
        d.free_iova(a.pfn_lo)  # no double free
    d.check()


def test_retry_worker_finishes_erase() -> None:
    d, inj, released = _domain()
    a = d.alloc_iova(4, L32)
    assert a is not None
    inj.fail_next(1, ERASE)
    d.free_iova(a.pfn_lo)
    assert d.process_deferred() == 1
    assert d.deferred == [] and released == [a]
    assert d.find_iova(a.pfn_lo, include_deferred=True) is None
    again = d.alloc_iova(4, L32)
    assert again is not None and again.pfn_lo == a.pfn_lo
    d.check()


def test_retry_that_fails_again_stays_queued() -> None:
    d, inj, released = _domain()
    a = d.alloc_iova(1, L32)
    b = d.alloc_iova(1, L32)
    assert a is not None and b is not None
    inj.fail_next(3, ERASE)
    d.free_iova(a.pfn_lo)
    d.free_iova(b.pfn_lo)
    assert d.process_deferred() == 1  # first retry fails again, second succeeds
    assert d.deferred == [a] and released == [b]
    assert d.process_deferred() == 1 and released == [b, a]


def test_put_releases_deferred_exactly_once() -> None:
    d, inj, released = _domain()
    live = [d.alloc_iova(2, L32) for _ in range(10)]
    inj.fail_next(4, ERASE)
    for iova in live[:4]:
        assert iova is not None
        d.free_iova(iova.pfn_lo)
    assert len(d.deferred) == 4
    d.put_iova_domain()
    assert sorted(id(i) for i in released) == sorted(id(i) for i in live)


def test_deferred_blocks_space_then_reopens_32bit() -> None:
    """A deferred entry may make the 32-bit space genuinely full for a while; once the retry
    erases it the space must be usable again (max32 reset by the completed erase)."""
    d, inj, _ = _domain()
    d.reserve_iova(1, L32 - 1)
    last = d.alloc_iova(1, L32)
    assert last is not None
    inj.fail_next(1, ERASE)
    d.free_iova(last.pfn_lo)
    assert d.alloc_iova(1, L32) is None and d.max32_alloc_size == 1
    d.process_deferred()
    got = d.alloc_iova(1, L32)
    assert got is not None and got.pfn_lo == last.pfn_lo


def test_flush_with_failing_erase_defers() -> None:
    d, inj, released = _domain()
    p = d.alloc_iova_fast(1, L32)
    assert p is not None
    d.free_iova_fast(p, 1)
    inj.fail_next(1, ERASE)
    d.flush_rcaches()
    assert [i.pfn_lo for i in d.deferred] == [p] and released == []
    d.process_deferred()
    assert len(released) == 1 and len(d) == 0


def test_failed_insert_changes_nothing() -> None:
    d, inj, _ = _domain()
    inj.fail_next(1, INSERT)
    assert d.alloc_iova(1, L32) is None
    inj.fail_next(1, INSERT)
    assert d.reserve_iova(10, 20) is None
    assert len(d) == 0 and d.allocated_pfns == 0
    d.check()


def test_injector_probability_is_seeded() -> None:
    a = FailureInjector(0.5, seed=42)
    b = FailureInjector(0.5, seed=42)
    assert [a(ERASE) for _ in range(50)] == [b(ERASE) for _ in range(50)]
    only_erase = FailureInjector(1.0, ops=[ERASE])
    assert only_erase(INSERT) and not only_erase(ERASE)
    with pytest.raises(ValueError):
        FailureInjector(2.0)


def test_random_faults_keep_invariants() -> None:
    inj = FailureInjector(0.2, seed=9)
    released: list[Iova] = []
    d = IovaDomain(G, 1, node_alloc=inj, on_release=released.append)
    import random

    rng = random.Random(9)
    live: list[tuple[int, int]] = []
    for step in range(3000):
        r = rng.random()
        if live and r < 0.4:
            pfn, size = live.pop(rng.randrange(len(live)))
            d.free_iova_fast(pfn, size)
        elif r < 0.45:
            d.process_deferred()
        else:
            size = rng.randint(1, 40)
            got = d.alloc_iova_fast(size, rng.choice([L32, 4095]))
            if got is not None:
                live.append((got, size))
        if step % 300 == 0:
            d.check()
    d.check()
    in_tree = len(d)
    before = len(released)
    d.put_iova_domain()
    assert len(released) == before + in_tree
    assert len({id(i) for i in released}) == len(released)  # each entry released once
