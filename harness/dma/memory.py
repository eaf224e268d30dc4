"""GuestMemory: translate guest IOVAs to host memoryviews over registered DMA regions."""

from __future__ import annotations

import bisect

from harness.dma.errors import DmaFault, RegionOverlap


class GuestMemory:
    """Sorted, non-overlapping IOVA regions, each backed by a byte memoryview.

    Lookups bisect over the sorted region starts (O(log n)): under a vIOMMU the guest maps one
    4 KiB page per region, so thousands of regions are normal. A view never spans two regions,
    even adjacent ones: they are separate host mappings that may be unmapped independently.
    """

    __slots__ = ("_ends", "_starts", "_views", "_writable")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._views: list[memoryview] = []
        self._writable: list[bool] = []

    def add_region(self, iova: int, view: memoryview, *, writable: bool) -> None:
        """Register ``view`` as the memory at [iova, iova + len(view)); overlap raises."""
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        size = view.nbytes
        if iova < 0 or size <= 0:
            raise ValueError(f"bad region iova={iova:#x} size={size:#x}")
        if writable and view.readonly:
            raise ValueError(f"region at {iova:#x} is writable but its view is read-only")
        i = bisect.bisect_left(self._starts, iova)
        if i > 0 and self._ends[i - 1] > iova:
            prev = self._starts[i - 1]
            raise RegionOverlap(iova, size, prev, self._ends[i - 1] - prev)
        if i < len(self._starts) and self._starts[i] < iova + size:
            nxt = self._starts[i]
            raise RegionOverlap(iova, size, nxt, self._ends[i] - nxt)
        self._starts.insert(i, iova)
        self._ends.insert(i, iova + size)
        self._views.insert(i, view)
        self._writable.insert(i, writable)

    def remove_range(self, iova: int, size: int) -> list[tuple[int, int]]:
        """Remove every region lying fully inside [iova, iova + size), as VFIO unmap does.

        Returns the removed (iova, size) pairs. Regions straddling an edge of the range stay:
        VFIO cannot split a mapping either.
        """
        end = iova + size
        lo = bisect.bisect_left(self._starts, iova)
        hi = lo
        while hi < len(self._starts) and self._starts[hi] < end:
            hi += 1
        removed: list[tuple[int, int]] = []
        keep: list[int] = []
        for i in range(lo, hi):
            if self._ends[i] <= end:
                removed.append((self._starts[i], self._ends[i] - self._starts[i]))
            else:
                keep.append(i)
        if removed:
            self._starts[lo:hi] = [self._starts[i] for i in keep]
            self._ends[lo:hi] = [self._ends[i] for i in keep]
            self._views[lo:hi] = [self._views[i] for i in keep]
            self._writable[lo:hi] = [self._writable[i] for i in keep]
        return removed

    def view(self, iova: int, length: int, *, write: bool) -> memoryview:
        """A zero-copy view of [iova, iova + length); DmaFault unless inside one region."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0 or length < 0 or iova + length > self._ends[i]:
            raise DmaFault(iova, length, "not inside one guest memory region")
        if write and not self._writable[i]:
            raise DmaFault(iova, length, "region is read-only")
        off = iova - self._starts[i]
        return self._views[i][off : off + length]

    def contains(self, iova: int, length: int) -> bool:
        """True when [iova, iova + length) lies inside one region."""
        i = bisect.bisect_right(self._starts, iova) - 1
        return i >= 0 and length >= 0 and iova + length <= self._ends[i]

    def regions(self) -> list[tuple[int, int, bool]]:
        """(iova, size, writable) of every region, sorted by iova."""
        return [
            (s, e - s, w) for s, e, w in zip(self._starts, self._ends, self._writable, strict=True)
        ]

    def __len__(self) -> int:
        return len(self._starts)
