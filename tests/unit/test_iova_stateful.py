"""Hypothesis state machine: IovaDomain against a bitmap model with exhaustive search.

The granule is 64 MiB so ``dma_32bit_pfn`` is 64 and limits in [0, 127] exercise both sides of
the max32 shortcut inside a model small enough to search exhaustively.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from harness.dma.iova import Iova, IovaDomain
from harness.dma.iova_faults import ERASE, INSERT, FailureInjector
from harness.testing.iova_strategies import IovaModel, alloc_requests, pfn_ranges

TOP = 128
GRANULE = 1 << 26


class IovaMachine(RuleBasedStateMachine):
    entries = Bundle("entries")

    def __init__(self) -> None:
        super().__init__()
        self.inj = FailureInjector()
        self.released: list[Iova] = []
        self.dom = IovaDomain(GRANULE, 0, node_alloc=self.inj, on_release=self.released.append)
        self.model = IovaModel(TOP, 0)
        self.deferred: list[Iova] = []
        self.cached: dict[int, int] = {}  # pfn -> size of ranges parked in the range caches
        self.aligned: list[Iova] = []

    @initialize(start=st.integers(0, 3))
    def set_start(self, start: int) -> None:
        self.dom = IovaDomain(GRANULE, start, node_alloc=self.inj, on_release=self.released.append)
        self.model.start_pfn = start

    @rule(target=entries, req=alloc_requests(TOP), fail=st.booleans())
    def alloc(self, req: tuple[int, int, bool], fail: bool) -> Iova | object:
        size, limit, aligned = req
        align = 1 << (size - 1).bit_length() if aligned else 1
        want = self.model.highest_fit(size, limit, align)
        if fail:
            self.inj.fail_next(1, INSERT)
        got = self.dom.alloc_iova(size, limit, aligned)
        note(f"alloc({size}, {limit}, {aligned}) -> {got!r}, model {want}, fail={fail}")
        if fail:
            self.inj._forced.pop(INSERT, None)  # unused when the search found nothing
            assert got is None
            return multiple()
        # Highest fit, and "no false full": None only when the exhaustive search finds nothing.
        assert (got.pfn_lo if got else None) == want
        if got is None:
            return multiple()
        self.model.take(got.pfn_lo, got.pfn_hi)
        if aligned:
            self.aligned.append(got)
        return got

    @rule(entry=consumes(entries), offset=st.integers(0, 64), fail=st.booleans())
    def free(self, entry: Iova, offset: int, fail: bool) -> None:
        if fail:
            self.inj.fail_next(1, ERASE)
        self.dom.free_iova(entry.pfn_lo + offset % entry.size)
        if fail:
            self.deferred.append(entry)  # still occupies its space
        else:
            self.model.release(entry.pfn_lo, entry.pfn_hi)
        if entry in self.aligned:
            self.aligned.remove(entry)

    @precondition(lambda self: bool(self.deferred))
    @rule()
    def retry_deferred(self) -> None:
        done = self.dom.process_deferred()
        assert done == len(self.deferred)
        for e in self.deferred:
            self.model.release(e.pfn_lo, e.pfn_hi)
        self.deferred.clear()

    @rule(size=st.integers(1, 40), limit=st.integers(0, TOP - 1))
    def alloc_fast(self, size: int, limit: int) -> None:
        flushes = self.dom.stats["cache_flushes"]
        pfn = self.dom.alloc_iova_fast(size, limit)
        rsize = 1 << (size - 1).bit_length() if size < 32 else size
        note(f"alloc_fast({size}, {limit}) -> {pfn}")
        if pfn is not None and self.cached.get(pfn) == rsize and pfn + rsize - 1 <= limit:
            del self.cached[pfn]
        else:
            if self.dom.stats["cache_flushes"] != flushes:
                for p, s in self.cached.items():
                    self.model.release(p, p + s - 1)
                self.cached.clear()
            want = self.model.highest_fit(rsize, limit, 1 << (rsize - 1).bit_length())
            if pfn is None:
                assert want is None
                return
            assert pfn == want
            self.model.take(pfn, pfn + rsize - 1)
        self.dom.free_iova_fast(pfn, size)  # straight back: exercises the caches
        if rsize <= 32:
            self.cached[pfn] = rsize
        else:
            self.model.release(pfn, pfn + rsize - 1)

    @rule()
    def flush(self) -> None:
        self.dom.flush_rcaches()
        for p, s in self.cached.items():
            self.model.release(p, p + s - 1)
        self.cached.clear()

    @rule(rng=pfn_ranges(TOP))
    def reserve(self, rng: tuple[int, int]) -> None:
        lo, hi = rng
        got = self.dom.reserve_iova(lo, hi)
        assert got is not None and got.pfn_lo <= hi <= got.pfn_hi
        self.model.reserve(lo, hi)

    @rule(pfn=st.integers(0, TOP + 4))
    def find(self, pfn: int) -> None:
        got = self.dom.find_iova(pfn, include_deferred=True)
        assert (got is not None) == (pfn < TOP and bool(self.model.used[pfn]))
        if got is not None:
            assert got.pfn_lo <= pfn <= got.pfn_hi

    @invariant()
    def tree_is_consistent(self) -> None:
        self.dom.check()  # ordering, no overlap, gap index, cached/deferred entries in the tree

    @invariant()
    def accounting(self) -> None:
        assert self.dom.allocated_pfns == self.model.allocated()
        assert sum(i.size for i in self.dom) == self.model.allocated()

    @invariant()
    def alignment(self) -> None:
        for i in self.aligned:
            assert i.pfn_lo % (1 << (i.size - 1).bit_length()) == 0

    @invariant()
    def max32_never_lies(self) -> None:
        """The shortcut may only claim "full" for sizes that truly do not fit below 64."""
        for size in range(self.dom.max32_alloc_size, min(self.dom.max32_alloc_size + 3, 70)):
            assert self.model.highest_fit(size, self.dom.dma_32bit_pfn - 1) is None
        for size in range(self.dom.max32_aligned_size, min(self.dom.max32_aligned_size + 3, 70)):
            align = 1 << (size - 1).bit_length()
            assert self.model.highest_fit(size, self.dom.dma_32bit_pfn - 1, align) is None

    def teardown(self) -> None:
        before = len(self.released)
        in_tree = len(self.dom)
        self.dom.put_iova_domain()
        assert len(self.released) == before + in_tree
        assert len({id(i) for i in self.released}) == len(self.released)


def note(msg: str) -> None:
    from hypothesis import note as hnote

    hnote(msg)


def multiple() -> object:
    from hypothesis.stateful import multiple as hmultiple

    return hmultiple()


IovaMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIovaMachine = IovaMachine.TestCase
