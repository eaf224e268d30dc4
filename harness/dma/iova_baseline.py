"""The pre-2026 IOVA allocator (rbtree + cached nodes + linear search backwards): the baseline.

This reproduces ``__alloc_and_insert_iova_range`` as it was before the maple tree conversion:
start at ``cached_node`` (or ``cached32_node`` for limits at or below ``dma_32bit_pfn``), walk
``rb_prev`` one entry at a time until a gap fits, retry once from ``iova_find_limit`` above the
cached node, and arm ``max32_alloc_size`` on failure. It exists so the benchmark can show the old
cost side by side; it is not used by the device.

Deliberate differences from the kernel: the red-black tree is a sorted list of chunks (insert
and erase O(sqrt n) memmoves of small lists, ``rb_prev``/``rb_next`` O(1)), and a cached node is
kept as the entry and found again by bisection (O(log n)) before the walk, which the kernel gets
for free. The walk itself, the cost being modelled, is the kernel's step for step.
"""

from __future__ import annotations

from bisect import bisect_right, insort

from harness.dma.iova_cache import IOVA_RANGE_CACHE_MAX_SIZE, RangeCache
from harness.dma.rangetree import Iova

__all__ = ["BaselineIovaDomain"]

_CHUNK = 512
_Pos = tuple[int, int]


class _SortedRanges:
    """Entries sorted by pfn_lo, in chunks; positions are (chunk, index)."""

    def __init__(self, first: Iova) -> None:
        self.los: list[list[int]] = [[first.pfn_lo]]
        self.objs: list[list[Iova]] = [[first]]
        self.mins: list[int] = [first.pfn_lo]
        self.count = 1

    def pos_le(self, pfn: int) -> _Pos | None:
        """Position of the last entry with pfn_lo <= pfn."""
        c = bisect_right(self.mins, pfn) - 1
        if c < 0:
            return None
        return c, bisect_right(self.los[c], pfn) - 1

    def at(self, pos: _Pos) -> Iova:
        return self.objs[pos[0]][pos[1]]

    def prev(self, pos: _Pos) -> _Pos | None:
        c, i = pos
        if i > 0:
            return c, i - 1
        if c > 0:
            return c - 1, len(self.los[c - 1]) - 1
        return None

    def next(self, pos: _Pos) -> _Pos | None:
        c, i = pos
        if i + 1 < len(self.los[c]):
            return c, i + 1
        if c + 1 < len(self.los):
            return c + 1, 0
        return None

    def insert(self, obj: Iova) -> None:
        c = max(bisect_right(self.mins, obj.pfn_lo) - 1, 0)
        los = self.los[c]
        i = bisect_right(los, obj.pfn_lo)
        los.insert(i, obj.pfn_lo)
        self.objs[c].insert(i, obj)
        self.mins[c] = los[0]
        self.count += 1
        if len(los) > 2 * _CHUNK:
            self.los.insert(c + 1, los[_CHUNK:])
            self.objs.insert(c + 1, self.objs[c][_CHUNK:])
            del los[_CHUNK:]
            del self.objs[c][_CHUNK:]
            insort(self.mins, self.los[c + 1][0])

    def remove(self, pos: _Pos) -> None:
        c, i = pos
        del self.los[c][i]
        del self.objs[c][i]
        self.count -= 1
        if not self.los[c]:
            del self.los[c]
            del self.objs[c]
            del self.mins[c]
        else:
            self.mins[c] = self.los[c][0]


class BaselineIovaDomain:
    """The old allocator with the same interface subset as :class:`~harness.dma.iova.IovaDomain`."""

    IOVA_ANCHOR = (1 << 64) - 1

    def __init__(self, granule: int, start_pfn: int, *, ncpus: int = 1) -> None:
        if granule <= 0 or granule & (granule - 1):
            raise ValueError(f"granule {granule} is not a power of two")
        self.granule = granule
        self.shift = granule.bit_length() - 1
        self.start_pfn = start_pfn
        self.dma_32bit_pfn = 1 << (32 - self.shift)
        self.max32_alloc_size = self.dma_32bit_pfn
        self.anchor = Iova(self.IOVA_ANCHOR, self.IOVA_ANCHOR)
        self._tree = _SortedRanges(self.anchor)
        self.cached_node = self.anchor
        self.cached32_node = self.anchor
        self._rcache = RangeCache(ncpus, self.free_iova)
        self.walk_steps = 0  # rb_prev steps taken, to show the cost model at work

    def __len__(self) -> int:
        return self._tree.count - 1

    def _pos(self, iova: Iova) -> _Pos:
        pos = self._tree.pos_le(iova.pfn_lo)
        assert pos is not None and self._tree.at(pos) is iova
        return pos

    def _find_limit(self, limit_pfn: int) -> Iova:
        # The kernel's crude shortcut: above 4 GiB just start from the anchor.
        if limit_pfn > self.dma_32bit_pfn:
            return self.anchor
        pos = self._tree.pos_le(limit_pfn)
        if pos is None:
            return self._tree.at((0, 0))
        node = self._tree.at(pos)
        if node.pfn_hi >= limit_pfn:
            return node
        nxt = self._tree.next(pos)
        return self.anchor if nxt is None else self._tree.at(nxt)

    def alloc_iova(self, size: int, limit_pfn: int, size_aligned: bool = False) -> Iova | None:
        """``alloc_iova``: highest fitting range ending at or below ``limit_pfn``, found by the
        old linear walk (so it may also miss fits, as the kernel could)."""
        limit = limit_pfn + 1  # the old code works with an exclusive limit
        mask = -(1 << (size - 1).bit_length()) if size_aligned else -1
        if limit <= self.dma_32bit_pfn and size >= self.max32_alloc_size:
            return None
        tree = self._tree
        curr = self.cached32_node if limit <= self.dma_32bit_pfn else self.cached_node
        pos: _Pos | None = self._pos(curr)
        retry_pfn = curr.pfn_hi
        high_pfn = limit
        low_pfn = self.start_pfn
        steps = 0
        while True:
            while True:
                high_pfn = min(high_pfn, curr.pfn_lo)
                new_pfn = (high_pfn - size) & mask
                assert pos is not None
                pos = tree.prev(pos)
                steps += 1
                if pos is None:
                    break
                curr = tree.at(pos)
                if not (new_pfn <= curr.pfn_hi and new_pfn >= low_pfn):
                    break
            if high_pfn < size or new_pfn < low_pfn:
                if low_pfn == self.start_pfn and retry_pfn < limit:
                    high_pfn = limit
                    low_pfn = retry_pfn + 1
                    curr = self._find_limit(limit)
                    pos = self._pos(curr)
                    continue
                self.walk_steps += steps
                self.max32_alloc_size = size
                return None
            break
        self.walk_steps += steps
        new = Iova(new_pfn, new_pfn + size - 1)
        tree.insert(new)
        if new.pfn_hi < self.dma_32bit_pfn:
            self.cached32_node = new
        else:
            self.cached_node = new
        return new

    def find_iova(self, pfn: int) -> Iova | None:
        pos = self._tree.pos_le(pfn)
        if pos is None:
            return None
        iova = self._tree.at(pos)
        return iova if iova.pfn_hi >= pfn and iova is not self.anchor else None

    def free_iova(self, pfn: int) -> None:
        pos = self._tree.pos_le(pfn)
        iova = None if pos is None else self._tree.at(pos)
        if pos is None or iova is None or iova.pfn_hi < pfn or iova is self.anchor:
            raise KeyError(pfn)
        nxt = self._tree.next(pos)
        after = self.anchor if nxt is None else self._tree.at(nxt)
        # __cached_rbnode_delete_update
        c32 = self.cached32_node
        if iova is c32 or (iova.pfn_hi < self.dma_32bit_pfn and iova.pfn_lo >= c32.pfn_lo):
            self.cached32_node = after
        if iova.pfn_lo < self.dma_32bit_pfn:
            self.max32_alloc_size = self.dma_32bit_pfn
        if iova.pfn_lo >= self.cached_node.pfn_lo:
            self.cached_node = after
        self._tree.remove(pos)

    def alloc_iova_fast(
        self, size: int, limit_pfn: int, flush_rcache: bool = True, cpu: int = 0
    ) -> int | None:
        if size < 1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1):
            size = 1 << (size - 1).bit_length()
        pfn = self._rcache.get(size, limit_pfn, cpu)
        if pfn is not None:
            return pfn
        iova = self.alloc_iova(size, limit_pfn, True)
        if iova is None and flush_rcache:
            self._rcache.flush()
            iova = self.alloc_iova(size, limit_pfn, True)
        return None if iova is None else iova.pfn_lo

    def free_iova_fast(self, pfn: int, size: int, cpu: int = 0) -> None:
        if not self._rcache.insert(pfn, size, cpu):
            self.free_iova(pfn)
