"""The entries and nodes of :mod:`harness.dma.rangetree`'s B+ tree: :class:`Iova` (one allocated
range with its payload), ``_Node`` (a node's parallel key / gap / kid lists and gap class bytes),
``_lower_max`` (a node's new max gap after one shrank) and the ``_Path`` a descent records.

Only data and per-node primitives live here; the tree that links the nodes is
:class:`harness.dma.rangetree.RangeTree` (its searches in :mod:`harness.dma.rangetree_search`).
"""

from __future__ import annotations

from collections.abc import MutableSequence
from typing import Any

__all__ = ["Iova"]


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
