"""Hypothesis strategies and a trivially correct model for testing IOVA domains.

:class:`IovaModel` is a bitmap over a small pfn space with an exhaustive search, so it is
obviously right and can judge any allocator: the highest aligned fit, "no false full", and the
accounting. The strategies draw requests that stay inside such a space.
"""

from __future__ import annotations

from hypothesis import strategies as st

__all__ = ["IovaModel", "alloc_requests", "pfn_ranges"]


class IovaModel:
    """Occupancy of pfns ``[0, top)``; allocations at or above ``start_pfn``."""

    def __init__(self, top: int, start_pfn: int = 0) -> None:
        self.top = top
        self.start_pfn = start_pfn
        self.used = bytearray(top)

    def is_free(self, lo: int, hi: int) -> bool:
        return 0 <= lo <= hi < self.top and not any(self.used[lo : hi + 1])

    def highest_fit(self, size: int, limit: int, align: int = 1) -> int | None:
        """The highest start of a free, ``align``-aligned ``size`` range ending <= limit."""
        start = ((min(limit, self.top - 1) - size + 1) // align) * align
        while start >= self.start_pfn:
            if self.is_free(start, start + size - 1):
                return start
            start -= align
        return None

    def take(self, lo: int, hi: int) -> None:
        if not self.is_free(lo, hi):
            raise AssertionError(f"model: [{lo}, {hi}] is not free")
        self.used[lo : hi + 1] = b"\x01" * (hi - lo + 1)

    def reserve(self, lo: int, hi: int) -> None:
        self.used[lo : hi + 1] = b"\x01" * (hi - lo + 1)

    def release(self, lo: int, hi: int) -> None:
        if not all(self.used[lo : hi + 1]):
            raise AssertionError(f"model: [{lo}, {hi}] is not allocated")
        self.used[lo : hi + 1] = bytes(hi - lo + 1)

    def allocated(self) -> int:
        return sum(self.used)


def alloc_requests(top: int, max_size: int = 9) -> st.SearchStrategy[tuple[int, int, bool]]:
    """``(size, limit_pfn, size_aligned)`` inside a model of ``top`` pfns."""
    return st.tuples(st.integers(1, max_size), st.integers(0, top - 1), st.booleans())


def pfn_ranges(top: int, max_len: int = 16) -> st.SearchStrategy[tuple[int, int]]:
    """``(lo, hi)`` with ``hi - lo < max_len`` inside ``[0, top)``."""
    return st.integers(0, top - 1).flatmap(
        lambda lo: st.tuples(st.just(lo), st.integers(lo, min(top - 1, lo + max_len - 1)))
    )
