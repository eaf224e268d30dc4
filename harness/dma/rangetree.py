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

Layout: the entries and node primitives (:class:`Iova`, ``_Node``, ``_lower_max``) are in
:mod:`harness.dma.rangetree_node`; the tree's layout, lookups, gap search and ``locate`` in
:mod:`harness.dma.rangetree_search` (``RangeTreeBase``). This module keeps the fan-outs, the
updates (insert, erase), the structure maintenance (split, rebalance, maxgap propagation) and
``check``, all under :class:`RangeTree`, and re-exports :class:`Iova`.
"""

from __future__ import annotations

from array import array

from harness.dma.rangetree_node import Iova, _lower_max, _Node, _Path
from harness.dma.rangetree_search import RangeTreeBase

__all__ = ["LEAF_MAX", "NODE_MAX", "Iova", "RangeTree", "TreeCorruption"]

# Fan-outs: big enough that the tree stays 3-4 levels deep at 300,000 entries, small enough that
# the Python-level scans inside one node (rightmost gap >= size) stay short.
LEAF_MAX = 128
NODE_MAX = 64
_LEAF_MIN = LEAF_MAX // 4
_NODE_MIN = NODE_MAX // 4


class TreeCorruption(AssertionError):
    """Raised by :meth:`RangeTree.check` when an invariant of the tree does not hold."""


class RangeTree(RangeTreeBase):
    """Disjoint ranges ordered by address, with the free gaps between them indexed by size.

    ``top`` is one past the highest usable pfn; the anchor sentinel sits there.
    """

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
