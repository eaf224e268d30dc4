"""The read side of :class:`harness.dma.rangetree.RangeTree`: the tree's layout and every
operation that only reads it.

:class:`RangeTreeBase` sets up the root, the sentinels and the top gap, and answers lookups
(``find``, iteration, ``free_pfns``), the top-down gap search (``find_gap`` and its depth-first
fallback ``_search``) and the descents the updates start from (``locate``, ``locate_entry``,
``gap_above``, ``entry_at``). :class:`~harness.dma.rangetree.RangeTree` adds the updates, the
structure maintenance and ``check``; see :mod:`harness.dma.rangetree` for the design.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator

from harness.dma.rangetree_node import _GE, Iova, _Node, _Path

__all__ = ["RangeTreeBase"]


class RangeTreeBase:
    """The layout and the read-only operations of :class:`~harness.dma.rangetree.RangeTree`
    (the only subclass); not used on its own."""

    def __init__(self, top: int) -> None:
        self.top = top
        self._bottom = Iova(-1, -1)
        self._anchor = Iova(top, top)
        leaf = _Node([-1, top], [0, 0], [self._bottom, self._anchor])
        self._root = leaf
        self._height = 0  # number of internal levels above the leaves
        self._count = 0
        # The highest entry below the anchor (maybe the bottom sentinel) and its real gap; the
        # tree stores 0 as its gap.
        self._last = self._bottom
        self._topgap = top
        # Internal keys are array('q') unless the anchor's key does not fit in one (granules of
        # one or two bytes); then they stay lists.
        self._key_array = top < 1 << 63

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return self._count

    @property
    def height(self) -> int:
        """Number of internal levels (0: the root is a leaf)."""
        return self._height

    def find(self, pfn: int) -> Iova | None:
        """The entry whose range contains ``pfn``, or None."""
        node = self._root
        for _ in range(self._height):
            node = node.kids[bisect_right(node.keys, pfn) - 1]  # type: ignore[assignment]
        i = bisect_right(node.keys, pfn) - 1
        if i < 0:
            return None
        obj: Iova = node.kids[i]  # type: ignore[assignment]
        if obj.pfn_hi >= pfn and obj is not self._bottom and obj is not self._anchor:
            return obj
        return None

    def __iter__(self) -> Iterator[Iova]:
        """All entries in address order (sentinels excluded)."""
        for leaf in self._leaves(self._root, self._height):
            for obj in leaf.kids:
                if obj is not self._bottom and obj is not self._anchor:
                    yield obj  # type: ignore[misc]

    def _leaves(self, node: _Node, depth: int) -> Iterator[_Node]:
        if depth == 0:
            yield node
            return
        for kid in node.kids:
            yield from self._leaves(kid, depth - 1)  # type: ignore[arg-type]

    def free_pfns(self, lo: int, hi: int) -> int:
        """Free pfns in ``[lo, hi]`` (O(n); for tests and accounting)."""
        total = 0
        prev_hi = -1
        for obj in [*self, self._anchor]:
            a, b = max(prev_hi + 1, lo), min(obj.pfn_lo - 1, hi)
            if b >= a:
                total += b - a + 1
            prev_hi = obj.pfn_hi
        return total

    # ------------------------------------------------------------------ gap search

    def find_gap(
        self, size: int, limit: int, floor: int, mask: int
    ) -> tuple[_Path, int, int] | None:
        """Find the highest ``start`` with ``start & ~mask == 0``, ``floor <= start`` and
        ``start + size - 1 <= limit`` such that the range is free.

        Returns ``(path to the gap owner's leaf, owner index in the leaf, start)`` for
        :meth:`insert_at`, or None when no such range exists (never a false "full").

        Slot ``c`` of a node on the limit's path (the one holding the last entry at or below the
        limit) is the only one the limit can cut. The search walks that path down while the cut
        child's max gap could hold ``size`` and tries the cut entry's gap clamped to the limit;
        then it climbs back to the lowest node with a candidate left of its cut slot and goes
        down the rightmost candidates from there. Everything left of the limit's path lies
        wholly below the limit, so that descent only fails on a gap that is misaligned or below
        ``floor``; :meth:`_search` then carries on depth-first from where it failed, at a cost
        of one step per such gap.
        """
        last = self._last
        if limit >= last.pfn_lo:
            # The limit cuts the top gap (kept outside the tree): try it, then search the rest
            # of the tree, where every gap lies wholly below the limit and the stored 0 of the
            # highest entry rules its gap out.
            hi = last.pfn_hi
            top = hi + self._topgap
            if top > limit:
                top = limit
            start = (top - size + 1) & mask
            if start > hi and start >= floor:
                path, j = self.locate(last.pfn_lo)
                return path, j, start
            limit = self.top - 1
        node = self._root
        height = self._height
        nodes = [node]
        cuts: list[int] = []
        lv = 0
        while True:
            c = bisect_right(node.keys, limit) - 1
            if c < 0:  # the limit is below the bottom sentinel: nothing can fit
                return None
            cuts.append(c)
            if lv == height:
                # The cut entry: its gap may reach past the limit.
                g = node.gaps[c]
                if g >= size:
                    hi = node.kids[c].pfn_hi  # type: ignore[attr-defined]
                    top = hi + g
                    if top > limit:
                        top = limit
                    start = (top - size + 1) & mask
                    if start > hi and start >= floor:
                        return (nodes, cuts[:-1]), c, start
                break
            if node.gaps[c] < size:
                break
            node = node.kids[c]  # type: ignore[assignment]
            nodes.append(node)
            lv += 1
        # Climb to the lowest node on the path with a candidate slot left of its cut.
        k = size.bit_length()
        ge = _GE[k]
        while True:
            i = node.cls.translate(ge).rfind(1, 0, cuts[lv]) if node.maxgap >= size else -1
            if i >= 0:
                break
            if lv == 0:
                return None
            lv -= 1
            node = nodes[lv]
        del nodes[lv + 1 :]
        idxs = cuts[:lv]
        # Go down the rightmost candidates; _search takes over at the first that fails.
        while True:
            if lv == height:
                g = node.gaps[i]
                if g >= size:
                    hi = node.kids[i].pfn_hi  # type: ignore[attr-defined]
                    start = (hi + g - size + 1) & mask
                    if start > hi and start >= floor:
                        return (nodes, idxs), i, start
                break
            if node.gaps[i] < size:
                break
            idxs.append(i)
            node = node.kids[i]  # type: ignore[assignment]
            nodes.append(node)
            lv += 1
            # The child's max fits, so it has a candidate; when size's class is the child's top
            # class too, the class bytes can be searched as they are.
            if node.maxgap.bit_length() == k:
                i = node.cls.rfind(k)
            else:
                i = node.cls.translate(ge).rfind(1)
        found = self._search(nodes, idxs, node, lv, i, size, floor, mask)
        return None if found is None else ((nodes, idxs), found[0], found[1])

    def _search(
        self,
        nodes: list[_Node],
        idxs: list[int],
        node: _Node,
        lv: int,
        i: int,
        size: int,
        floor: int,
        mask: int,
    ) -> tuple[int, int] | None:
        """Depth-first search for :meth:`find_gap`: the rightmost fit among the slots left of
        ``i`` in ``node`` (level ``lv``, last in ``nodes``; ``idxs`` holds the path to it), then
        left of the path's slot in each ancestor. Returns (leaf index, start) with the path to
        the leaf in ``nodes``/``idxs``, or None."""
        height = self._height
        k = size.bit_length()
        ge = _GE[k]
        while True:
            if i > 0 and node.maxgap >= size:
                gaps = node.gaps
                # Gap classes >= k mark the candidates; when k is also the node's top class the
                # class bytes can be searched as they are.
                if node.maxgap.bit_length() == k:
                    marks = node.cls
                    needle = k
                else:
                    marks = node.cls.translate(ge)
                    needle = 1
                i = marks.rfind(needle, 0, i)
                if lv == height:
                    kids = node.kids
                    while i >= 0:
                        g = gaps[i]
                        if g >= size:
                            hi: int = kids[i].pfn_hi  # type: ignore[attr-defined]
                            start = (hi + g - size + 1) & mask
                            if start > hi and start >= floor:
                                return i, start
                        i = marks.rfind(needle, 0, i)
                else:
                    while i >= 0:
                        if gaps[i] >= size:
                            idxs.append(i)
                            node = node.kids[i]  # type: ignore[assignment]
                            nodes.append(node)
                            lv += 1
                            i = len(node.gaps)  # all of the child's slots
                            break
                        i = marks.rfind(needle, 0, i)
                    if i >= 0:
                        continue
            # Nothing (more) fits in this node: back up to the parent, left of where we were.
            if lv == 0:
                return None
            nodes.pop()
            lv -= 1
            node = nodes[-1]
            i = idxs.pop()

    def locate(self, pfn: int) -> tuple[_Path, int]:
        """Path to the leaf of the last entry with ``pfn_lo <= pfn`` (maybe a sentinel), index."""
        nodes: list[_Node] = []
        idxs: list[int] = []
        node = self._root
        for _ in range(self._height):
            c = bisect_right(node.keys, pfn) - 1
            nodes.append(node)
            idxs.append(c)
            node = node.kids[c]  # type: ignore[assignment]
        nodes.append(node)
        return (nodes, idxs), bisect_right(node.keys, pfn) - 1

    def locate_entry(self, pfn: int) -> tuple[_Path, int, Iova | None]:
        """:meth:`locate` and :meth:`find` in one descent: the path, the index and the entry
        containing ``pfn`` (None if no entry contains it)."""
        path, i = self.locate(pfn)
        obj: Iova = path[0][-1].kids[i]  # type: ignore[assignment]
        if pfn < 0 or obj.pfn_hi < pfn or obj is self._anchor:
            return path, i, None  # (pfn >= 0 makes i >= 0 and rules out the bottom sentinel)
        return path, i, obj

    def gap_above(self, path: _Path, j: int) -> tuple[int, int]:
        """The free range ``(first, last)`` owned by entry j of the path's leaf (may be empty)."""
        leaf = path[0][-1]
        obj: Iova = leaf.kids[j]  # type: ignore[assignment]
        hi = obj.pfn_hi
        return hi + 1, hi + (self._topgap if obj is self._last else leaf.gaps[j])

    def entry_at(self, path: _Path, j: int) -> Iova | None:
        """Entry j of the path's leaf, or None if it is a sentinel."""
        obj: Iova = path[0][-1].kids[j]  # type: ignore[assignment]
        return None if obj is self._bottom or obj is self._anchor else obj
