"""A gap-augmented B+ tree of disjoint pfn ranges: top-down gap search and lookup in O(log n).

This is the Python counterpart of the maple tree the kernel's IOVA allocator uses since
"iova: use maple tree for O(log n) allocation" (2026): every internal node keeps, per child, the
largest free gap inside that child (``maple_arange_64`` does the same), so a search for the highest
gap that fits can skip whole subtrees.

Deliberate differences from the kernel's maple tree:

* Free space is not stored as NULL ranges. Each entry owns the gap *above* it
  (``gap = next.pfn_lo - pfn_hi - 1``), kept in a list parallel to the entries of its leaf. Two
  hidden sentinels bound the space: one at pfn -1 (owns the free space from pfn 0 upwards) and an
  anchor just above the highest pfn (the kernel's ``IOVA_ANCHOR``). Inserting into a gap therefore
  touches exactly one leaf (the gap's owner's); erasing touches at most two.
* The highest entry's gap (the free space up to the anchor, usually most of the address space
  above the allocations) is kept in ``_topgap`` and stored as 0 in the tree. Otherwise it would
  make every node on the rightmost path look like it has room, and a search under a limit at or
  above the highest entry would have to walk that path down and back up each time.
* Nodes are parallel Python lists (``keys``/``gaps``/``kids``) rather than one object per slot, and
  leaves hold the entries' start pfns, gaps and entry objects. That keeps the per-entry cost to a
  few list slots plus the entry itself, and lets ``bisect`` (C code) do the search inside a node.
  An internal node's keys are an ``array('q')`` instead: its separators are entries' ``pfn_lo``
  ints from all over the heap, so a ``bisect`` over a list of them takes a cache miss per probe.
* The tree never allocates "nodes" that can fail: node-allocation failure is modelled one layer up
  (:mod:`harness.dma.iova_faults`), which asks before each write, so a failed write leaves the tree
  untouched.
* Alignment is checked exactly while searching, so a gap is only rejected when no aligned block of
  the requested size fits in it. A search costs O(log n) plus one step per gap that is large enough
  but misaligned (the kernel v2 dropped the aligned search instead).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterator, MutableSequence
from typing import Any

__all__ = ["LEAF_MAX", "NODE_MAX", "Iova", "RangeTree", "TreeCorruption"]

# Fan-outs: big enough that the tree stays 3-4 levels deep at 300,000 entries, small enough that
# the Python-level scans inside one node (rightmost gap >= size) stay short.
LEAF_MAX = 128
NODE_MAX = 64
_LEAF_MIN = LEAF_MAX // 4
_NODE_MIN = NODE_MAX // 4


class TreeCorruption(AssertionError):
    """Raised by :meth:`RangeTree.check` when an invariant of the tree does not hold."""


class Iova:
    """One allocated range ``[pfn_lo, pfn_hi]`` (inclusive, like ``struct iova``) with a payload.

    ``payload`` is free for the owner (the map-ops layer keeps the host view there). The pfns must
    not be changed while the entry is in a tree.
    """

    __slots__ = ("payload", "pfn_hi", "pfn_lo")

    def __init__(self, pfn_lo: int, pfn_hi: int, payload: Any = None) -> None:
        self.pfn_lo = pfn_lo
        self.pfn_hi = pfn_hi
        self.payload: Any = payload  # the owner's; typed Any so owners need no casts

    @property
    def size(self) -> int:
        """Number of pfns in the range."""
        return self.pfn_hi - self.pfn_lo + 1

    def __repr__(self) -> str:
        return f"Iova({self.pfn_lo:#x}, {self.pfn_hi:#x})"


# _GE[b] maps a gap class byte to 1 when the class is >= b: translating a node's class bytes
# with it and calling rfind() finds the rightmost candidate slot in C instead of a Python loop.
_GE = [bytes(1 if v >= b else 0 for v in range(256)) for b in range(80)]


_Keys = MutableSequence[int]  # list[int] in leaves, array('q') in internal nodes


class _Node:
    """A tree node. In a leaf ``kids`` are :class:`Iova` entries, ``keys`` their ``pfn_lo`` and
    ``gaps`` the free pfns above each entry; in an internal node ``kids`` are nodes, ``keys`` the
    smallest ``pfn_lo`` below each child and ``gaps`` each child's ``maxgap``. ``cls`` mirrors
    ``gaps`` as ``gap.bit_length()`` bytes, which is what the searches scan. A leaf's ``keys`` is
    a list (sharing the entries' int objects), an internal node's an ``array('q')``."""

    __slots__ = ("cls", "gaps", "keys", "kids", "maxgap")

    def __init__(
        self, keys: _Keys, gaps: list[int], kids: list[object], cls: bytearray | None = None
    ) -> None:
        self.keys = keys
        self.gaps = gaps
        self.kids = kids
        self.cls = bytearray(g.bit_length() for g in gaps) if cls is None else cls
        self.maxgap = max(gaps)


def _lower_max(node: _Node, old: int) -> int:
    """The node's max gap, known to be <= ``old``: found through the class bytes, so the common
    case (one slot in the top class, or classes 0/1 whose value is the class) avoids max()."""
    cls = node.cls
    k = old.bit_length()
    while k > 0:
        i = cls.find(k)
        if i >= 0:
            if k == 1:
                return 1
            if cls.rfind(k) == i:
                return node.gaps[i]
            return max(node.gaps)
        k -= 1
    return 0


# A path from the root: the nodes visited and the child index taken in each.
_Path = tuple[list[_Node], list[int]]


class RangeTree:
    """Disjoint ranges ordered by address, with the free gaps between them indexed by size.

    ``top`` is one past the highest usable pfn; the anchor sentinel sits there.
    """

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

    # ------------------------------------------------------------------ updates

    def insert_at(self, path: _Path, j: int, obj: Iova) -> None:
        """Insert ``obj`` into the gap owned by entry j of the path's leaf (from :meth:`find_gap`
        or :meth:`locate`); the range must lie inside that gap."""
        nodes, idxs = path
        leaf = nodes[-1]
        gaps = leaf.gaps
        owner: Iova = leaf.kids[j]  # type: ignore[assignment]
        if owner is self._last:
            self._insert_top(path, j, obj)
            return
        g = gaps[j]
        ohi = owner.pfn_hi
        lo = obj.pfn_lo
        hi = obj.pfn_hi
        if not (ohi < lo <= hi <= ohi + g):
            raise ValueError(f"{obj!r} is not inside the gap above {owner!r}")
        below = lo - ohi - 1
        above = ohi + g - hi
        gaps[j] = below
        gaps.insert(j + 1, above)
        cls = leaf.cls
        cls[j] = below.bit_length()
        cls.insert(j + 1, above.bit_length())
        leaf.keys.insert(j + 1, lo)
        leaf.kids.insert(j + 1, obj)
        self._count += 1
        if len(gaps) > LEAF_MAX:
            if g == leaf.maxgap:
                leaf.maxgap = _lower_max(leaf, g)
            self._split(nodes, idxs, j + 1)
            return
        # Both pieces are <= the old gap, so the leaf max only moves if that gap was the max;
        # then each ancestor's max only moves if the child's old max was its max too.
        if g != leaf.maxgap:
            return
        # (g == 1, the usual case here, needs no call: the new max is 1 if a 1 is left, else 0.)
        new = (1 if 1 in cls else 0) if g == 1 else _lower_max(leaf, g)
        lv = len(idxs)
        while new != g:
            nodes[lv].maxgap = new
            if lv == 0:
                return
            lv -= 1
            parent = nodes[lv]
            c = idxs[lv]
            parent.gaps[c] = new
            parent.cls[c] = new.bit_length()
            if g != parent.maxgap:
                return
            new = (1 if 1 in parent.cls else 0) if g == 1 else _lower_max(parent, g)

    def _insert_top(self, path: _Path, j: int, obj: Iova) -> None:
        """:meth:`insert_at` into the top gap: store it in the tree, insert, and take the new
        highest entry's gap out."""
        owner = self._last
        if not (owner.pfn_hi < obj.pfn_lo <= obj.pfn_hi <= owner.pfn_hi + self._topgap):
            raise ValueError(f"{obj!r} is not inside the gap above {owner!r}")
        self._set_gap(owner, self._topgap)
        self._last = obj  # owner is an ordinary entry for insert_at now
        self.insert_at(path, j, obj)
        self._topgap = self._set_gap(obj, 0)

    def _set_gap(self, obj: Iova, value: int) -> int:
        """Store ``value`` as ``obj``'s gap in the tree, whichever way the maxgaps above it have
        to move; returns the old value. O(LEAF_MAX): for the rare changes of the top gap."""
        (nodes, idxs), j = self.locate(obj.pfn_lo)
        leaf = nodes[-1]
        old = leaf.gaps[j]
        leaf.gaps[j] = value
        leaf.cls[j] = value.bit_length()
        leaf.maxgap = max(leaf.gaps)
        self._propagate(nodes, idxs, len(idxs))
        return old

    def erase(self, obj: Iova) -> None:
        """Remove ``obj`` (which must be in the tree); its space joins the gap below it."""
        path, i = self.locate(obj.pfn_lo)
        if i < 0 or path[0][-1].kids[i] is not obj:
            raise KeyError(obj)
        self.erase_at(path, i)

    def erase_at(self, path: _Path, i: int) -> None:
        """Remove entry i of the path's leaf (from :meth:`locate`)."""
        obj: Iova = path[0][-1].kids[i]  # type: ignore[assignment]
        if obj is self._bottom or obj is self._anchor:
            raise KeyError(obj)
        if obj is self._last:
            self._erase_top(path, i)
            return
        nodes, idxs = path
        leaf = nodes[-1]
        gaps = leaf.gaps
        old = gaps[i]
        freed = obj.pfn_hi - obj.pfn_lo + 1 + old
        if i > 0:
            v = gaps[i - 1] + freed
            gaps[i - 1] = v
            leaf.cls[i - 1] = v.bit_length()
            del leaf.keys[i]
            del gaps[i]
            del leaf.cls[i]
            del leaf.kids[i]
            self._count -= 1
            # v > old: the leaf's new max is max(old max, v), so it can only grow.
            if len(gaps) >= _LEAF_MIN or not idxs:
                if v > leaf.maxgap:
                    leaf.maxgap = v
                    # Push the growth up while it raises an ancestor's max.
                    lv = len(idxs) - 1
                    while lv >= 0:
                        parent = nodes[lv]
                        c = idxs[lv]
                        parent.gaps[c] = v
                        parent.cls[c] = v.bit_length()
                        if v <= parent.maxgap:
                            return
                        parent.maxgap = v
                        lv -= 1
                return
            if v > leaf.maxgap:
                leaf.maxgap = v
        else:
            # The entry below lives in the previous leaf: grow its gap there first.
            (pnodes, pidxs), pj = self.locate(obj.pfn_lo - 1)
            pleaf = pnodes[-1]
            v = pleaf.gaps[pj] + freed
            pleaf.gaps[pj] = v
            pleaf.cls[pj] = v.bit_length()
            if v > pleaf.maxgap:
                pleaf.maxgap = v
                self._propagate(pnodes, pidxs, len(pidxs))
            del leaf.keys[i]
            del gaps[i]
            del leaf.cls[i]
            del leaf.kids[i]
            self._count -= 1
            if old == leaf.maxgap:
                leaf.maxgap = _lower_max(leaf, old) if gaps else 0
            if gaps:
                self._fix_keys(nodes, idxs, leaf.keys[0])
        self._rebalance(nodes, idxs)

    def _erase_top(self, path: _Path, i: int) -> None:
        """:meth:`erase_at` of the highest entry: store the top gap in the tree, erase, and take
        the new highest entry's gap out."""
        obj = self._last
        (pnodes, _), pj = self.locate(obj.pfn_lo - 1)
        below: Iova = pnodes[-1].kids[pj]  # type: ignore[assignment]
        self._set_gap(obj, self._topgap)
        self._last = below  # obj is an ordinary entry for erase_at now
        self.erase_at(path, i)
        self._topgap = self._set_gap(below, 0)

    # ------------------------------------------------------------------ structure maintenance

    @staticmethod
    def _propagate(nodes: list[_Node], idxs: list[int], level: int) -> None:
        """Push nodes[level].maxgap up into its ancestors, stopping once nothing changes."""
        newmax = nodes[level].maxgap
        for lv in range(level - 1, -1, -1):
            parent = nodes[lv]
            c = idxs[lv]
            gaps = parent.gaps
            old = gaps[c]
            if old == newmax:
                return
            gaps[c] = newmax
            parent.cls[c] = newmax.bit_length()
            pmax = parent.maxgap
            if newmax > pmax:
                parent.maxgap = newmax
            elif old == pmax:
                parent.maxgap = _lower_max(parent, pmax)
            if parent.maxgap == pmax:
                return
            newmax = parent.maxgap

    @staticmethod
    def _fix_keys(nodes: list[_Node], idxs: list[int], key: int) -> None:
        """The first key below idxs' last level changed: update separators while first child."""
        for lv in range(len(idxs) - 1, -1, -1):
            nodes[lv].keys[idxs[lv]] = key
            if idxs[lv] != 0:
                return

    def _split(self, nodes: list[_Node], idxs: list[int], pos: int) -> None:
        """Split the overfull nodes[-1] (pos: where the last insert went), then propagate."""
        level = len(nodes) - 1
        while True:
            node = nodes[level]
            n = len(node.keys)
            # Sequential fills (top-down allocation inserts right above the lowest entry) would
            # leave half-empty nodes behind with an even split; split next to the insert instead.
            if pos <= 1:
                s = pos + 1
            elif pos >= n - 1:
                s = pos
            else:
                s = n // 2
            right = _Node(node.keys[s:], node.gaps[s:], node.kids[s:], node.cls[s:])
            del node.keys[s:]
            del node.gaps[s:]
            del node.kids[s:]
            del node.cls[s:]
            node.maxgap = max(node.gaps)
            if level == 0:
                two = [node.keys[0], right.keys[0]]
                self._root = _Node(
                    array("q", two) if self._key_array else two,
                    [node.maxgap, right.maxgap],
                    [node, right],
                )
                self._height += 1
                return
            parent = nodes[level - 1]
            c = idxs[level - 1]
            parent.keys.insert(c + 1, right.keys[0])
            parent.gaps.insert(c + 1, right.maxgap)
            parent.cls.insert(c + 1, right.maxgap.bit_length())
            parent.kids.insert(c + 1, right)
            parent.gaps[c] = node.maxgap
            parent.cls[c] = node.maxgap.bit_length()
            parent.maxgap = max(parent.gaps)
            if len(parent.keys) <= NODE_MAX:
                self._propagate(nodes, idxs, level - 1)
                return
            pos = c + 1
            level -= 1

    def _set_kid(self, parent: _Node, i: int, kid: _Node) -> None:
        parent.gaps[i] = kid.maxgap
        parent.cls[i] = kid.maxgap.bit_length()

    def _rebalance(self, nodes: list[_Node], idxs: list[int]) -> None:
        """After an erase: merge or even out the shrunk node with a sibling, up the path."""
        level = len(nodes) - 1
        while level > 0:
            node = nodes[level]
            parent = nodes[level - 1]
            c = idxs[level - 1]
            leafy = level == self._height
            n = len(node.keys)
            if n >= (_LEAF_MIN if leafy else _NODE_MIN):
                break
            maximum = LEAF_MAX if leafy else NODE_MAX
            if len(parent.kids) == 1:
                if n > 0:
                    break
                # An only child went empty (possible after an uneven split): empty the parent
                # too and let the next level merge it away.
                del parent.keys[:]
                parent.gaps.clear()
                parent.kids.clear()
                parent.cls.clear()
                parent.maxgap = 0
                level -= 1
                continue
            li = c - 1 if c > 0 else c
            left: _Node = parent.kids[li]  # type: ignore[assignment]
            right: _Node = parent.kids[li + 1]  # type: ignore[assignment]
            if len(left.keys) + len(right.keys) <= maximum:
                left.keys += right.keys
                left.gaps += right.gaps
                left.kids += right.kids
                left.cls += right.cls
                left.maxgap = max(left.gaps)
                del parent.keys[li + 1]
                del parent.gaps[li + 1]
                del parent.kids[li + 1]
                del parent.cls[li + 1]
                self._set_kid(parent, li, left)
                parent.maxgap = max(parent.gaps)
                if parent.keys[li] != left.keys[0]:
                    parent.keys[li] = left.keys[0]
                    if li == 0:
                        self._fix_keys(nodes, idxs[: level - 1], left.keys[0])
                level -= 1
                continue
            # Too many for one node: share them out evenly; the parent keeps its shape.
            keys = left.keys[:]
            keys += right.keys
            gaps = left.gaps + right.gaps
            kids = left.kids + right.kids
            cls = left.cls + right.cls
            s = len(keys) // 2
            left.keys, left.gaps, left.kids, left.cls = keys[:s], gaps[:s], kids[:s], cls[:s]
            right.keys, right.gaps, right.kids, right.cls = keys[s:], gaps[s:], kids[s:], cls[s:]
            left.maxgap = max(left.gaps)
            right.maxgap = max(right.gaps)
            parent.keys[li + 1] = right.keys[0]
            self._set_kid(parent, li, left)
            self._set_kid(parent, li + 1, right)
            parent.maxgap = max(parent.gaps)
            if parent.keys[li] != left.keys[0]:
                parent.keys[li] = left.keys[0]
                if li == 0:
                    self._fix_keys(nodes, idxs[: level - 1], left.keys[0])
            level -= 1
            break
        self._propagate(nodes, idxs, level)
        root = self._root
        while self._height > 0 and len(root.kids) == 1:
            root = root.kids[0]  # type: ignore[assignment]
            self._height -= 1
        self._root = root

    # ------------------------------------------------------------------ validation

    def check(self) -> None:
        """Verify every structural invariant (O(n)); raise :class:`TreeCorruption` if broken."""
        entries: list[Iova] = []

        def walk(node: _Node, depth: int, lo_bound: int) -> tuple[int, int]:
            """Returns (min key, max gap) of the subtree."""
            if not node.keys or not (len(node.keys) == len(node.gaps) == len(node.kids)):
                raise TreeCorruption("node lists out of step or empty")
            if node.cls != bytearray(g.bit_length() for g in node.gaps):
                raise TreeCorruption("gap class bytes stale")
            if depth == self._height:
                if type(node.keys) is not list:
                    raise TreeCorruption("leaf keys are not a list")
                if len(node.keys) > LEAF_MAX:
                    raise TreeCorruption("leaf overfull")
                for key, obj in zip(node.keys, node.kids, strict=True):
                    if not isinstance(obj, Iova) or obj.pfn_lo != key:
                        raise TreeCorruption(f"leaf key {key} does not match {obj!r}")
                    entries.append(obj)
                if node.maxgap != max(node.gaps):
                    raise TreeCorruption("leaf maxgap stale")
                return node.keys[0], node.maxgap
            if (
                not (isinstance(node.keys, array) and node.keys.typecode == "q")
                if self._key_array
                else type(node.keys) is not list
            ):
                raise TreeCorruption("internal node keys of the wrong type")
            if len(node.keys) > NODE_MAX:
                raise TreeCorruption("node overfull")
            for key, gap, kid in zip(node.keys, node.gaps, node.kids, strict=True):
                if not isinstance(kid, _Node):
                    raise TreeCorruption("internal node holds an entry")
                kmin, kmax = walk(kid, depth + 1, key)
                if kmin != key or kmax != gap:
                    raise TreeCorruption(f"separator/gap stale: {key}/{gap} vs {kmin}/{kmax}")
            if node.maxgap != max(node.gaps):
                raise TreeCorruption("node maxgap stale")
            return node.keys[0], node.maxgap

        walk(self._root, 0, -1)
        if entries[0] is not self._bottom or entries[-1] is not self._anchor:
            raise TreeCorruption("sentinels missing")
        if entries[-2] is not self._last:
            raise TreeCorruption(f"highest entry is {entries[-2]!r}, not {self._last!r}")
        gaps: list[int] = []
        for leaf in self._leaves(self._root, self._height):
            gaps += leaf.gaps
        if gaps[-2] != 0:
            raise TreeCorruption("the highest entry's gap is stored in the tree")
        gaps[-2] = self._topgap
        for a, b, g in zip(entries, entries[1:], gaps, strict=False):
            if a.pfn_hi < a.pfn_lo and a is not self._bottom:
                raise TreeCorruption(f"inverted range {a!r}")
            if b.pfn_lo <= a.pfn_hi:
                raise TreeCorruption(f"overlap {a!r} {b!r}")
            if g != b.pfn_lo - a.pfn_hi - 1:
                raise TreeCorruption(f"gap above {a!r} is {g}, expected {b.pfn_lo - a.pfn_hi - 1}")
        if len(entries) - 2 != self._count:
            raise TreeCorruption("count wrong")
