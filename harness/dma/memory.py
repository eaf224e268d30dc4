"""GuestMemory: the guest's DMA regions kept in an IOVA domain, translating IOVA -> host view.

Each region libvfio-user registers (page-aligned, fd-backed, mmapped; or unmappable, with no
view) is a reserved range of an :class:`~harness.dma.iova.IovaDomain` whose ``payload`` is the
:class:`GuestRegion`, so translation is one O(log n) ``find_iova``. Under a vIOMMU the guest
maps one 4 KiB page per region, so thousands of regions are normal.

Mappings (DmaHandles) that point into a region are registered with it. Removing a region that
still has mappings revokes them first: their guest-side views are released (any later use
raises instead of touching unmapped memory), the handles are marked ``revoked`` and the event is
counted and logged. Nothing here keeps a view of memory that is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from harness.dma.errors import DmaFault, RegionOverlap
from harness.dma.iova import Iova, IovaDomain

if TYPE_CHECKING:
    from harness.dma.mapops import DmaHandle

log = logging.getLogger(__name__)

GRANULE = 4096
_4G = 1 << 32


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


class GuestMemory:
    """Non-overlapping guest DMA regions in an IovaDomain; lookups are O(log n).

    A view never spans two regions, even adjacent ones: they are separate host mappings that
    may be unmapped independently. ``on_revoke`` (if set) is called for every handle revoked by
    a removal, after it was revoked.
    """

    def __init__(self, *, granule: int = GRANULE) -> None:
        self.domain = IovaDomain(granule, 0)
        self.granule = granule
        self._shift = self.domain.shift
        self.revocations = 0  # regions removed while mappings into them were live
        self.revoked_handles = 0
        self.mapped_bytes = 0
        self.on_revoke: Callable[[DmaHandle], None] | None = None
        # Last region a lookup hit: without a vIOMMU nearly every access falls in the one big
        # RAM region, so this saves the tree walk on the data path. Cleared on removal.
        self._last: GuestRegion | None = None

    # ---- regions -----------------------------------------------------------------------------

    def add_region(
        self, iova: int, view: memoryview | None, *, writable: bool, size: int | None = None
    ) -> GuestRegion:
        """Register ``view`` as the memory at [iova, iova + len(view)); overlap raises.

        ``view`` may be None (a region we cannot access, e.g. a ROM/MMIO window) when ``size``
        is given: it still occupies its IOVAs so the domain mirrors libvfio-user's list.
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
        lo = iova >> self._shift
        hi = (iova + size - 1) >> self._shift
        if hi > self.domain.max_pfn:
            raise ValueError(f"region {iova:#x}+{size:#x} beyond the 64-bit IOVA space")
        other = self._first_overlap(lo, hi)
        if other is not None:
            raise RegionOverlap(iova, size, other.iova, other.size)
        entry = self.domain.reserve_iova(lo, hi)
        # Without a node-allocation hook the reservation cannot fail, and since [lo, hi] was
        # entirely free it is exactly one new entry.
        if entry is None or entry.pfn_lo != lo or entry.pfn_hi != hi:
            raise AssertionError(f"reserve_iova({lo:#x}, {hi:#x}) gave {entry!r}")
        region = GuestRegion(iova, size, view, writable)
        entry.payload = region
        self.mapped_bytes += size
        return region

    def _first_overlap(self, lo: int, hi: int) -> GuestRegion | None:
        """The lowest region intersecting pfns [lo, hi], in O(log n)."""
        tree = self.domain.tree
        path, j = tree.locate(lo)
        entry = tree.entry_at(path, j)
        if entry is not None and entry.pfn_hi >= lo:
            return _region(entry)
        _first, last = tree.gap_above(path, j)
        if last >= hi:
            return None
        nxt = self.domain.find_iova(last + 1)
        return None if nxt is None else _region(nxt)

    def _regions_in(self, iova: int, size: int) -> list[GuestRegion]:
        """Regions intersecting [iova, iova + size), in address order: O(k log n)."""
        out: list[GuestRegion] = []
        if size <= 0:
            return out
        dom = self.domain
        tree = dom.tree
        pfn = max(iova, 0) >> self._shift
        last = min((iova + size - 1) >> self._shift, dom.max_pfn)
        while pfn <= last:
            entry = dom.find_iova(pfn)
            if entry is not None:
                out.append(_region(entry))
                pfn = entry.pfn_hi + 1
            else:
                path, j = tree.locate(pfn)
                pfn = tree.gap_above(path, j)[1] + 1
        return out

    def remove_range(self, iova: int, size: int) -> list[tuple[int, int]]:
        """Remove every region lying fully inside [iova, iova + size), as VFIO unmap does.

        Returns the removed (iova, size) pairs. Regions straddling an edge of the range stay:
        VFIO cannot split a mapping either. Live mappings into a removed region are revoked
        before it goes (the caller unmaps the host memory right after this returns).
        """
        end = iova + size
        removed: list[tuple[int, int]] = []
        self._last = None
        for region in self._regions_in(iova, size):
            if region.iova < iova or region.end > end:
                continue
            if region.live:
                self._revoke(region)
            self.domain.free_iova(region.iova >> self._shift)
            self.mapped_bytes -= region.size
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
        entry = self.domain.find_iova(iova >> self._shift)
        if entry is None:
            return None
        region = _region(entry)
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
        """(iova, size, writable) of every region, sorted by iova (read from the domain)."""
        out = []
        for entry in self.domain:
            r = _region(entry)
            out.append((r.iova, r.size, r.writable))
        return out

    def __len__(self) -> int:
        return len(self.domain)

    def fragmentation(self) -> dict[str, float | int]:
        """The IOVA space as the device sees it: regions, mapped bytes, and the free space
        below 4 GiB (largest gap, total, ``1 - largest/total``: 0 = one hole, ->1 = shredded).
        O(n): for summaries, not the data path."""
        largest = total = 0
        prev_end = 0
        for entry in self.domain:
            r = _region(entry)
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
            "regions": len(self.domain),
            "mapped_bytes": self.mapped_bytes,
            "largest_free_below_4g": largest,
            "free_below_4g": total,
            "free_fragmentation": (1.0 - largest / total) if total else 0.0,
        }

    def check(self) -> None:
        """Verify the domain and the regions agree (O(n); tests)."""
        self.domain.check()
        total = 0
        for entry in self.domain:
            r = entry.payload
            if not isinstance(r, GuestRegion):
                raise AssertionError(f"{entry!r} has no region")
            if (entry.pfn_lo << self._shift, (entry.pfn_hi + 1) << self._shift) != (r.iova, r.end):
                raise AssertionError(f"{entry!r} does not match {r!r}")
            total += r.size
        if total != self.mapped_bytes:
            raise AssertionError(f"mapped_bytes {self.mapped_bytes} != {total}")


def _region(entry: Iova) -> GuestRegion:
    # Every entry of the domain is a reserved region whose payload is set right after
    # reserve_iova: the cast states that invariant (check() verifies it).
    return cast(GuestRegion, entry.payload)


def _describe(h: DmaHandle) -> str:
    ctx = h.ctx
    where = f"{ctx[0]} desc {ctx[1]} " if ctx is not None else ""
    return f"{where}iova {h.iova:#x}+{h.size:#x}"
