"""GuestMemory: the guest's DMA regions in a region index, translating IOVA -> host view.

Each region libvfio-user registers (page-aligned, fd-backed, mmapped; or unmappable, with no
view) is a :class:`GuestRegion` in a region index (:mod:`harness.dma.regionindex`: a sorted
list by default, the IovaDomain range tree with HARNESS_GUEST_INDEX=tree), so translation is
one O(log n) lookup. Under a vIOMMU the guest maps one 4 KiB page per region, so thousands of
regions are normal, and each add/remove is on the guest's critical path.

Mappings (DmaHandles) that point into a region are registered with it. Removing a region that
still has mappings revokes them first: their guest-side views are released (any later use
raises instead of touching unmapped memory), the handles are marked ``revoked`` and the event is
counted and logged. Nothing here keeps a view of memory that is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from harness.dma.errors import DmaFault
from harness.dma.regionindex import RegionIndex, index_kind, make_index

if TYPE_CHECKING:
    from harness.dma.mapops import DmaHandle

log = logging.getLogger(__name__)

GRANULE = 4096
_4G = 1 << 32
_MAX_IOVA = 1 << 64


def release(view: memoryview | None) -> None:
    """Release a view so later use raises ValueError instead of touching memory.

    A live buffer export (someone still holding a raw buffer of it) makes release impossible;
    that consumer's reference then simply outlives the mapping. (try/except rather than
    contextlib.suppress: this runs per buffer, and try is free.)
    """
    if view is None:
        return
    try:  # noqa: SIM105
        view.release()
    except BufferError:
        pass


class GuestRegion:
    """One registered DMA region: ``[iova, end)``, its host view (None: not mappable by us),
    its protection, and the live mappings into it (for revocation)."""

    __slots__ = ("end", "iova", "live", "size", "view", "writable")

    def __init__(self, iova: int, size: int, view: memoryview | None, writable: bool) -> None:
        self.iova = iova
        self.size = size
        self.end = iova + size
        self.view = view
        self.writable = writable
        self.live: set[DmaHandle] = set()

    def __repr__(self) -> str:
        return f"GuestRegion({self.iova:#x}+{self.size:#x}, {'rw' if self.writable else 'ro'})"


class RegionWatcher(Protocol):
    """Told of every region added and removed, in order (harness.virtio.fastpath keeps a C
    table of the regions' host addresses in step this way, without rebuilding it)."""

    def region_added(self, region: GuestRegion) -> None: ...

    def region_removed(self, region: GuestRegion) -> None:
        """``region`` left the index; its view is released right after this returns."""
        ...


class GuestMemory:
    """Non-overlapping guest DMA regions in a region index; lookups are O(log n).

    A view never spans two regions, even adjacent ones: they are separate host mappings that
    may be unmapped independently. ``on_revoke`` (if set) is called for every handle revoked by
    a removal, after it was revoked.
    """

    def __init__(self, *, granule: int = GRANULE, index: str | None = None) -> None:
        self.granule = granule
        #: "sorted" or "tree" (None: HARNESS_GUEST_INDEX, default sorted).
        self.index_kind = index_kind() if index is None else index
        self._index: RegionIndex = make_index(self.index_kind, granule)
        self.revocations = 0  # regions removed while mappings into them were live
        self.revoked_handles = 0
        self.mapped_bytes = 0
        self.on_revoke: Callable[[DmaHandle], None] | None = None
        # Last region a lookup hit: without a vIOMMU nearly every access falls in the one big
        # RAM region, so this saves the tree walk on the data path. Cleared on removal.
        self._last: GuestRegion | None = None
        #: Told of every add and remove (``watch``): whoever keeps host pointers into the
        #: regions drops them here, before the memory can go.
        self._watchers: list[RegionWatcher] = []

    # ---- regions -----------------------------------------------------------------------------

    def add_region(
        self, iova: int, view: memoryview | None, *, writable: bool, size: int | None = None
    ) -> GuestRegion:
        """Register ``view`` as the memory at [iova, iova + len(view)); overlap raises.

        ``view`` may be None (a region we cannot access, e.g. a ROM/MMIO window) when ``size``
        is given: it still occupies its IOVAs so the index mirrors libvfio-user's list.
        """
        if view is not None:
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            if size is not None and size != view.nbytes:
                raise ValueError(f"region at {iova:#x}: size {size:#x} != view {view.nbytes:#x}")
            size = view.nbytes
            if writable and view.readonly:
                raise ValueError(f"region at {iova:#x} is writable but its view is read-only")
        if size is None or iova < 0 or size <= 0:
            raise ValueError(f"bad region iova={iova:#x} size={size}")
        mask = self.granule - 1
        if iova & mask or size & mask:
            raise ValueError(
                f"region {iova:#x}+{size:#x} is not aligned to the {self.granule:#x} granule"
            )
        if iova + size > _MAX_IOVA:
            raise ValueError(f"region {iova:#x}+{size:#x} beyond the 64-bit IOVA space")
        region = GuestRegion(iova, size, view, writable)
        self._index.add(region)  # RegionOverlap if it intersects a registered region
        self.mapped_bytes += size
        for w in self._watchers:
            w.region_added(region)
        return region

    def remove_range(self, iova: int, size: int) -> list[tuple[int, int]]:
        """Remove every region lying fully inside [iova, iova + size), as VFIO unmap does.

        Returns the removed (iova, size) pairs. Regions straddling an edge of the range stay:
        VFIO cannot split a mapping either. Live mappings into a removed region are revoked
        before it goes (the caller unmaps the host memory right after this returns).
        """
        end = iova + size
        removed: list[tuple[int, int]] = []
        self._last = None
        if size <= 0:
            return removed
        index = self._index
        for region in index.inside(iova, end):
            if region.live:
                self._revoke(region)
            index.remove(region)
            self.mapped_bytes -= region.size
            for w in self._watchers:
                w.region_removed(region)
            release(region.view)
            region.view = None
            removed.append((region.iova, region.size))
        return removed

    def _revoke(self, region: GuestRegion) -> None:
        handles = list(region.live)
        region.live.clear()
        self.revocations += 1
        self.revoked_handles += len(handles)
        log.warning(
            "DMA region %#x+%#x removed with %d live mapping(s): revoked (%s)",
            region.iova, region.size, len(handles),
            ", ".join(_describe(h) for h in handles[:4]) + (" ..." if len(handles) > 4 else ""),
        )  # fmt: skip
        hook = self.on_revoke
        for h in handles:
            h.revoked = True
            release(h.guest)
            if not h.bounced:  # the device's own view is guest memory too
                release(h.view)
            if hook is not None:
                hook(h)

    # ---- translation -------------------------------------------------------------------------

    def lookup(self, iova: int) -> GuestRegion | None:
        """The region containing ``iova``, or None (O(log n))."""
        last = self._last
        if last is not None and last.iova <= iova < last.end:
            return last
        if iova < 0:
            return None
        region = self._index.find(iova)
        if region is not None:
            self._last = region
        return region

    def contiguous(self, iova: int, length: int) -> int:
        """How many bytes from ``iova`` (at most ``length``) one region translates.

        A device behind an IOMMU walks the guest's mapping page by page; we walk it region by
        region. Under a vIOMMU every guest page arrives as its own DMA region, so a buffer
        that crosses a page boundary must be mapped in pieces. An untranslatable ``iova``
        answers ``length``: mapping it then fails and is reported as usual.
        """
        region = self.lookup(iova)
        if region is None:
            return length
        end = region.end
        return length if iova + length <= end else end - iova

    def translate(self, iova: int, length: int, *, write: bool) -> tuple[memoryview, GuestRegion]:
        """A zero-copy view of [iova, iova + length) and its region; DmaFault unless the range
        lies inside one accessible region (and it is writable, for ``write``)."""
        region = self.lookup(iova)
        if region is None or length < 0 or iova + length > region.end:
            raise DmaFault(iova, length, "not inside one guest memory region")
        view = region.view
        if view is None:
            raise DmaFault(iova, length, "region is not mappable by the device")
        if write and not region.writable:
            raise DmaFault(iova, length, "region is read-only")
        off = iova - region.iova
        return view[off : off + length], region

    def view(self, iova: int, length: int, *, write: bool) -> memoryview:
        """A zero-copy view of [iova, iova + length); DmaFault unless inside one region."""
        return self.translate(iova, length, write=write)[0]

    def contains(self, iova: int, length: int) -> bool:
        """True when [iova, iova + length) lies inside one region."""
        region = self.lookup(iova)
        return region is not None and length >= 0 and iova + length <= region.end

    # ---- listing and accounting --------------------------------------------------------------

    def regions(self) -> list[tuple[int, int, bool]]:
        """(iova, size, writable) of every region, sorted by iova (read from the index)."""
        return [(r.iova, r.size, r.writable) for r in self._index]

    def region_objects(self) -> list[GuestRegion]:
        """The regions themselves, sorted by iova (for a fast path that keeps their host
        addresses; see ``watch``)."""
        return list(self._index)

    def watch(self, watcher: RegionWatcher) -> None:
        """Tell ``watcher`` of every region added or removed from now on."""
        self._watchers.append(watcher)

    def __len__(self) -> int:
        return len(self._index)

    def fragmentation(self) -> dict[str, float | int]:
        """The IOVA space as the device sees it: regions, mapped bytes, and the free space
        below 4 GiB (largest gap, total, ``1 - largest/total``: 0 = one hole, ->1 = shredded).
        O(n): for summaries, not the data path."""
        largest = total = 0
        prev_end = 0
        for r in self._index:
            if prev_end >= _4G:
                break
            gap = min(r.iova, _4G) - prev_end
            if gap > 0:
                total += gap
                largest = max(largest, gap)
            prev_end = r.end
        if prev_end < _4G:
            gap = _4G - prev_end
            total += gap
            largest = max(largest, gap)
        return {
            "regions": len(self._index),
            "mapped_bytes": self.mapped_bytes,
            "largest_free_below_4g": largest,
            "free_below_4g": total,
            "free_fragmentation": (1.0 - largest / total) if total else 0.0,
        }

    def check(self) -> None:
        """Verify the index and the regions agree (O(n); tests)."""
        self._index.check()
        total = 0
        for r in self._index:
            if not isinstance(r, GuestRegion) or r.end != r.iova + r.size:
                raise AssertionError(f"bad region {r!r} in the index")
            total += r.size
        if total != self.mapped_bytes:
            raise AssertionError(f"mapped_bytes {self.mapped_bytes} != {total}")


def _describe(h: DmaHandle) -> str:
    ctx = h.ctx
    where = f"{ctx[0]} desc {ctx[1]} " if ctx is not None else ""
    return f"{where}iova {h.iova:#x}+{h.size:#x}"
