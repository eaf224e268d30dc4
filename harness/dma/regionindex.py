"""GuestMemory's region index: which registered DMA region holds an IOVA.

Two implementations behind one small interface, chosen by ``HARNESS_GUEST_INDEX``:

- ``sorted`` (default): a sorted list of region starts searched with ``bisect`` plus a dict for
  exact starts. Under a vIOMMU every DMA_MAP/UNMAP adds or removes one 4 KiB region while
  QEMU's vCPU waits for our reply, so this is on the guest's critical path: an add/remove is a
  bisect and a list insert/delete (a memmove of a few KiB for thousands of regions);
- ``tree``: the regions as reservations in an :class:`~harness.dma.iova.IovaDomain` (the
  augmented range tree). It keeps gap bookkeeping (``_set_gap``/``_propagate``) on every
  insert and delete that GuestMemory never uses, since it only reserves fixed IOVAs: ~70% of a
  map+unmap pair in a profile (docs/PERFORMANCE.md). Kept for the paired A/B.

Both refuse an overlapping region and never split one; both answer in address order.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, cast

from harness import knobs
from harness.dma.errors import RegionOverlap
from harness.dma.iova import IovaDomain

if TYPE_CHECKING:
    from harness.dma.memory import GuestRegion

#: The device server's environment picks the index (``harness bench net --ab``).
INDEX_ENV = "HARNESS_GUEST_INDEX"
INDEX_KINDS = ("sorted", "tree")
DEFAULT_INDEX = "sorted"


def index_kind() -> str:
    """The index named by HARNESS_GUEST_INDEX (default ``sorted``); ValueError if unknown."""
    return knobs.choice(INDEX_ENV, INDEX_KINDS, DEFAULT_INDEX)


class RegionIndex(Protocol):
    """Non-overlapping regions by address."""

    def add(self, region: GuestRegion) -> None:
        """Insert ``region``; RegionOverlap (naming the lowest overlapped region) if any
        registered region intersects it."""

    def find(self, iova: int) -> GuestRegion | None:
        """The region containing ``iova`` (>= 0), or None."""

    def inside(self, iova: int, end: int) -> list[GuestRegion]:
        """The regions lying fully inside [iova, end), in address order."""

    def remove(self, region: GuestRegion) -> None:
        """Remove a registered region."""

    def __iter__(self) -> Iterator[GuestRegion]: ...

    def __len__(self) -> int: ...

    def check(self) -> None:
        """Verify the index's invariants (O(n); tests)."""


def make_index(kind: str, granule: int) -> RegionIndex:
    if kind == "sorted":
        return SortedRegionIndex()
    if kind == "tree":
        return TreeRegionIndex(granule)
    raise ValueError(f"unknown region index {kind!r}")


class SortedRegionIndex:
    """Region starts in a sorted list (``bisect``), regions in a parallel list, and a dict of
    start -> region: under a vIOMMU most lookups name a region's first page, one dict hit."""

    __slots__ = ("_by_start", "_regions", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[GuestRegion] = []
        self._by_start: dict[int, GuestRegion] = {}

    def add(self, region: GuestRegion) -> None:
        starts = self._starts
        i = bisect.bisect_left(starts, region.iova)
        regions = self._regions
        if i and regions[i - 1].end > region.iova:
            other = regions[i - 1]
        elif i < len(starts) and starts[i] < region.end:
            other = regions[i]
        else:
            starts.insert(i, region.iova)
            regions.insert(i, region)
            self._by_start[region.iova] = region
            return
        raise RegionOverlap(region.iova, region.size, other.iova, other.size)

    def find(self, iova: int) -> GuestRegion | None:
        region = self._by_start.get(iova)
        if region is not None:
            return region
        i = bisect.bisect_right(self._starts, iova)
        if not i:
            return None
        region = self._regions[i - 1]
        return region if iova < region.end else None

    def inside(self, iova: int, end: int) -> list[GuestRegion]:
        starts, regions = self._starts, self._regions
        i = bisect.bisect_left(starts, iova)
        out = []
        n = len(starts)
        while i < n and starts[i] < end:
            region = regions[i]
            if region.end <= end:
                out.append(region)
            i += 1
        return out

    def remove(self, region: GuestRegion) -> None:
        i = bisect.bisect_left(self._starts, region.iova)
        if i == len(self._starts) or self._regions[i] is not region:
            raise KeyError(f"{region!r} is not registered")
        del self._starts[i]
        del self._regions[i]
        del self._by_start[region.iova]

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter(list(self._regions))

    def __len__(self) -> int:
        return len(self._starts)

    def check(self) -> None:
        prev_end = -1
        if len(self._regions) != len(self._starts) or len(self._by_start) != len(self._starts):
            raise AssertionError("index lists disagree in length")
        for start, region in zip(self._starts, self._regions, strict=True):
            if start != region.iova or self._by_start.get(start) is not region:
                raise AssertionError(f"{region!r} indexed at {start:#x}")
            if start < prev_end:
                raise AssertionError(f"{region!r} overlaps the region before it")
            prev_end = region.end


class TreeRegionIndex:
    """The regions as reserved ranges of an IovaDomain whose ``payload`` is the region (the
    index before the sorted one: the A/B's old side)."""

    __slots__ = ("_shift", "domain")

    def __init__(self, granule: int) -> None:
        self.domain = IovaDomain(granule, 0)
        self._shift = self.domain.shift

    def add(self, region: GuestRegion) -> None:
        lo = region.iova >> self._shift
        hi = (region.end - 1) >> self._shift
        other = self._first_overlap(lo, hi)
        if other is not None:
            raise RegionOverlap(region.iova, region.size, other.iova, other.size)
        entry = self.domain.reserve_iova(lo, hi)
        # Without a node-allocation hook the reservation cannot fail, and since [lo, hi] was
        # entirely free it is exactly one new entry.
        if entry is None or entry.pfn_lo != lo or entry.pfn_hi != hi:
            raise AssertionError(f"reserve_iova({lo:#x}, {hi:#x}) gave {entry!r}")
        entry.payload = region

    def _first_overlap(self, lo: int, hi: int) -> GuestRegion | None:
        """The lowest region intersecting pfns [lo, hi], in O(log n)."""
        tree = self.domain.tree
        path, j = tree.locate(lo)
        entry = tree.entry_at(path, j)
        if entry is not None and entry.pfn_hi >= lo:
            return cast("GuestRegion", entry.payload)
        _first, last = tree.gap_above(path, j)
        if last >= hi:
            return None
        nxt = self.domain.find_iova(last + 1)
        return None if nxt is None else cast("GuestRegion", nxt.payload)

    def find(self, iova: int) -> GuestRegion | None:
        entry = self.domain.find_iova(iova >> self._shift)
        return None if entry is None else cast("GuestRegion", entry.payload)

    def inside(self, iova: int, end: int) -> list[GuestRegion]:
        out: list[GuestRegion] = []
        if end <= iova:
            return out
        dom = self.domain
        tree = dom.tree
        pfn = max(iova, 0) >> self._shift
        last = min((end - 1) >> self._shift, dom.max_pfn)
        while pfn <= last:
            entry = dom.find_iova(pfn)
            if entry is not None:
                region = cast("GuestRegion", entry.payload)
                if region.iova >= iova and region.end <= end:
                    out.append(region)
                pfn = entry.pfn_hi + 1
            else:
                path, j = tree.locate(pfn)
                pfn = tree.gap_above(path, j)[1] + 1
        return out

    def remove(self, region: GuestRegion) -> None:
        self.domain.free_iova(region.iova >> self._shift)

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter([cast("GuestRegion", e.payload) for e in self.domain])

    def __len__(self) -> int:
        return len(self.domain)

    def check(self) -> None:
        self.domain.check()
        for entry in self.domain:
            r = cast("GuestRegion", entry.payload)
            if r is None or (entry.pfn_lo << self._shift, (entry.pfn_hi + 1) << self._shift) != (
                r.iova, r.end
            ):
                raise AssertionError(f"{entry!r} does not match {r!r}")
