"""The IOVA domain: Linux ``drivers/iommu/iova.c`` (maple-tree version, 2026) in Python.

An :class:`IovaDomain` hands out ranges of pfns (page frame numbers of ``granule`` bytes) top-down
below a caller's limit, finds the range containing an address in O(log n), and parks freed small
ranges in per-CPU range caches. It sits on :class:`~harness.dma.rangetree.RangeTree`, whose gap
index keeps allocation O(log n) in every case, a 32-bit limit on a domain full of 64-bit
allocations included.

Where this deliberately differs from the kernel (each is also noted on the method):

* The ``max32_alloc_size`` shortcut is only armed by a *search* that found no gap while covering
  the whole 32-bit space, never by a failed node allocation (the v3 review bug that turned a
  transient GFP_ATOMIC failure into a permanently "full" 32-bit space), and aligned and unaligned
  failures are tracked apart, so the shortcut never answers "full" when a fit exists.
* ``find_iova`` hides entries whose erase is deferred (the owner already freed them, so for
  address translation they must look unmapped); ``include_deferred=True`` gives the kernel's view.
* Errors the kernel ignores or WARNs about raise: freeing an unknown pfn raises
  :class:`IovaNotFoundError`, bad arguments raise ``ValueError``, use after
  ``put_iova_domain`` raises :class:`IovaStateError`.
* ``reserve_iova`` fills the free parts of the range with new entries instead of growing
  overlapping entries downwards, so an existing entry never changes size under its owner.
* The deferred-erase retry worker is :meth:`IovaDomain.process_deferred`, called by the owner
  (there is no workqueue); "freeing" an entry means calling the ``on_release`` hook exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from harness.dma.iova_cache import IOVA_RANGE_CACHE_MAX_SIZE, RangeCache
from harness.dma.iova_faults import ERASE, INSERT, NodeAllocHook
from harness.dma.rangetree import Iova, RangeTree

__all__ = [
    "Iova",
    "IovaDomain",
    "IovaError",
    "IovaNotFoundError",
    "IovaStateError",
]

_log = logging.getLogger(__name__)

# Sizes below this are rounded up to a power of two by alloc_iova_fast so that whatever comes
# back from a cache bin is exactly the size the bin promises (the kernel's comment: freeing
# non-power-of-two sizes into the caches "will come back to bite us badly").
_FAST_ROUNDUP_BELOW = 1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1)


class IovaError(Exception):
    """Base of the IOVA domain's errors."""


class IovaNotFoundError(IovaError, KeyError):
    """No live entry contains the pfn (never allocated, already freed, or erase deferred)."""

    def __init__(self, pfn: int) -> None:
        super().__init__(pfn)
        self.pfn = pfn

    def __str__(self) -> str:
        return f"no IOVA entry contains pfn {self.pfn:#x}"


class IovaStateError(IovaError):
    """The domain was torn down by ``put_iova_domain``."""


class IovaDomain:
    """An IOVA allocator over pfns ``[0, (2**64 - 1) >> shift]`` with allocations at or above
    ``start_pfn`` (``init_iova_domain``).

    ``ncpus`` sizes the range caches (methods take ``cpu=``); ``node_alloc`` is the injectable
    node-allocation hook (:mod:`harness.dma.iova_faults`); ``on_release`` is called exactly once
    per entry when the kernel would free its ``struct iova``; ``max_align_shift`` caps size
    alignment like Android's ``CONFIG_IOMMU_LIMIT_IOVA_ALIGNMENT`` (mainline: no cap, None).
    """

    def __init__(
        self,
        granule: int,
        start_pfn: int,
        *,
        ncpus: int = 1,
        node_alloc: NodeAllocHook | None = None,
        on_release: Callable[[Iova], None] | None = None,
        max_align_shift: int | None = None,
    ) -> None:
        if granule <= 0 or granule & (granule - 1):
            raise ValueError(f"granule {granule} is not a power of two")
        if start_pfn < 0:
            raise ValueError("start_pfn must be >= 0")
        self.granule = granule
        self.shift = granule.bit_length() - 1
        self.start_pfn = start_pfn
        self.max_pfn = ((1 << 64) - 1) >> self.shift
        self.dma_32bit_pfn = 1 << (32 - self.shift) if self.shift < 32 else 1
        self.max_align_shift = max_align_shift
        self.node_alloc = node_alloc
        self.on_release = on_release
        self._tree = RangeTree(self.max_pfn + 1)
        self._rcache = RangeCache(ncpus, self.free_iova)
        # Smallest sizes known not to fit below dma_32bit_pfn, unaligned and aligned. The
        # kernel starts (and resets) at dma_32bit_pfn, which claims "full" for a size that does
        # fit when start_pfn is 0; the first size that cannot fit at all is exact.
        self._max32_none = max(1, self.dma_32bit_pfn - start_pfn + 1)
        self._max32 = self._max32_none
        self._max32_aligned = self._max32_none
        self._deferred: dict[int, Iova] = {}  # pfn_lo -> entry, in queueing order
        self._alive = True
        self.allocated_pfns = 0
        self.stats = {
            "nospace": 0,
            "nomem": 0,
            "max32_shortcut": 0,
            "deferred": 0,
            "deferred_done": 0,
            "cache_hits": 0,
            "cache_flushes": 0,
        }

    # ------------------------------------------------------------------ properties

    @property
    def max32_alloc_size(self) -> int:
        """Smallest size an unaligned request below ``dma_32bit_pfn`` is known not to fit (the
        kernel's field); ``dma_32bit_pfn - start_pfn + 1`` when nothing is known (the kernel
        uses ``dma_32bit_pfn``)."""
        return self._max32

    @property
    def max32_aligned_size(self) -> int:
        """The same for size-aligned requests (the kernel keeps only one value)."""
        return self._max32_aligned

    @property
    def rcache(self) -> RangeCache:
        """The range caches (read-only use: tests and accounting)."""
        return self._rcache

    @property
    def tree(self) -> RangeTree:
        """The range tree (read-only use: tests and accounting)."""
        return self._tree

    def __len__(self) -> int:
        """Entries in the tree: live, cached and deferred alike."""
        return len(self._tree)

    def __iter__(self) -> Iterator[Iova]:
        return iter(self._tree)

    @property
    def deferred(self) -> list[Iova]:
        """Entries whose erase failed and waits for :meth:`process_deferred`."""
        return list(self._deferred.values())

    def iova_pfn(self, addr: int) -> int:
        """The pfn of a byte address."""
        return addr >> self.shift

    def pfn_addr(self, pfn: int) -> int:
        """The byte address of a pfn."""
        return pfn << self.shift

    def _check_alive(self) -> None:
        if not self._alive:
            raise IovaStateError("IOVA domain used after put_iova_domain()")

    def _node_ok(self, op: str) -> bool:
        hook = self.node_alloc
        return hook is None or hook(op)

    # ------------------------------------------------------------------ allocation

    def alloc_iova(
        self, size: int, limit_pfn: int, size_aligned: bool = False, payload: object = None
    ) -> Iova | None:
        """Allocate the highest free ``size``-pfn range ending at or below ``limit_pfn``.

        With ``size_aligned`` the start is aligned to ``roundup_pow_of_two(size)`` (capped by
        ``max_align_shift``). Returns None when no aligned gap fits, or when the injected node
        allocation fails (transient: it does not arm the ``max32_alloc_size`` shortcut).
        """
        if not self._alive:
            self._check_alive()
        if size < 1:
            raise ValueError(f"size {size} < 1")
        limit = limit_pfn if limit_pfn < self.max_pfn else self.max_pfn
        if size_aligned:
            shift = (size - 1).bit_length()
            if self.max_align_shift is not None and shift > self.max_align_shift:
                shift = self.max_align_shift
            mask = -(1 << shift)
            known = self._max32_aligned
        else:
            mask = -1
            known = self._max32
        dma32 = self.dma_32bit_pfn
        if limit < dma32 and size >= known:
            self.stats["max32_shortcut"] += 1
            return None
        found = self._tree.find_gap(size, limit, self.start_pfn, mask)
        if found is None:
            self.stats["nospace"] += 1
            # Only a search that covered all of [start_pfn, dma_32bit_pfn) proves the 32-bit
            # space has no room for this size; a narrower limit proves nothing about it.
            if limit >= dma32 - 1:
                if size < self._max32_aligned:
                    self._max32_aligned = size
                if not size_aligned and size < self._max32:
                    self._max32 = size
            return None
        if self.node_alloc is not None and not self.node_alloc(INSERT):
            # The v3 bug was to arm max32_alloc_size here: this failure says nothing about space.
            self.stats["nomem"] += 1
            return None
        path, j, start = found
        # A one-pfn range shares one int object for both ends: less memory, one fewer cache
        # line for whoever reads the entry later.
        iova = Iova(start, start if size == 1 else start + size - 1, payload)
        self._tree.insert_at(path, j, iova)
        self.allocated_pfns += size
        return iova

    def reserve_iova(self, pfn_lo: int, pfn_hi: int) -> Iova | None:
        """Make ``[pfn_lo, pfn_hi]`` unavailable for allocation; returns the entry holding
        ``pfn_hi``, or None if the node allocation failed (nothing reserved then).

        Differs from the kernel: free parts become new entries (one per hole) instead of
        growing overlapping entries downwards; the whole reservation is one tree write.
        """
        self._check_alive()
        if not 0 <= pfn_lo <= pfn_hi <= self.max_pfn:
            raise ValueError(f"bad reservation [{pfn_lo:#x}, {pfn_hi:#x}]")
        holes: list[tuple[int, int]] = []
        pfn = pfn_lo
        tree = self._tree
        while pfn <= pfn_hi:
            path, j = tree.locate(pfn)
            first, last = tree.gap_above(path, j)
            if pfn < first:  # pfn is inside entry j: skip past it
                pfn = first
                continue
            end = min(last, pfn_hi)
            holes.append((pfn, end))
            pfn = end + 1
        if holes and not self._node_ok(INSERT):
            self.stats["nomem"] += 1
            return None
        for lo, hi in holes:
            path, j = tree.locate(lo)
            tree.insert_at(path, j, Iova(lo, hi))
            self.allocated_pfns += hi - lo + 1
        return tree.find(pfn_hi)

    # ------------------------------------------------------------------ lookup and free

    def find_iova(self, pfn: int, *, include_deferred: bool = False) -> Iova | None:
        """The entry containing ``pfn`` in O(log n), or None.

        Differs from the kernel: an entry whose erase is deferred is hidden unless
        ``include_deferred`` (the kernel returns it; it is still in its tree).
        """
        if not self._alive:
            self._check_alive()
        iova = self._tree.find(pfn)
        if (
            iova is not None
            and self._deferred
            and not include_deferred
            and self._deferred.get(iova.pfn_lo) is iova
        ):
            return None
        return iova

    def free_iova(self, pfn: int) -> None:
        """Free the entry containing ``pfn``. If the tree cannot erase it now (injected node
        allocation failure), the entry stays in the tree, still reserving its space, and is
        queued for :meth:`process_deferred`.

        Differs from the kernel: an unknown or already-freed pfn raises IovaNotFoundError.
        """
        if not self._alive:
            self._check_alive()
        # One descent serves both the lookup and the erase.
        tree = self._tree
        path, i, iova = tree.locate_entry(pfn)
        if iova is None or (self._deferred and self._deferred.get(iova.pfn_lo) is iova):
            raise IovaNotFoundError(pfn)
        self._remove(iova, path, i)

    def _remove(self, iova: Iova, path: object = None, i: int = 0) -> bool:
        """Erase an entry, or queue it when the node allocation fails; True if erased."""
        if self.node_alloc is not None and not self.node_alloc(ERASE):
            self._deferred[iova.pfn_lo] = iova
            self.stats["deferred"] += 1
            _log.debug("erase of %r deferred", iova)
            return False
        if path is None:
            self._tree.erase(iova)
        else:
            self._tree.erase_at(path, i)  # type: ignore[arg-type]
        self.allocated_pfns -= iova.pfn_hi - iova.pfn_lo + 1
        if iova.pfn_lo < self.dma_32bit_pfn:
            # Space opened below 4 GiB: whatever failed before may fit now.
            self._max32 = self._max32_aligned = self._max32_none
        if self.on_release is not None:
            self.on_release(iova)
        return True

    def process_deferred(self) -> int:
        """Retry deferred erases (the kernel's delayed work); returns how many completed.
        Entries that fail again stay queued."""
        self._check_alive()
        done = 0
        for pfn_lo, iova in list(self._deferred.items()):
            del self._deferred[pfn_lo]
            if self._remove(iova):
                done += 1
        self.stats["deferred_done"] += done
        return done

    # ------------------------------------------------------------------ range caches

    def alloc_iova_fast(
        self, size: int, limit_pfn: int, flush_rcache: bool = True, cpu: int = 0
    ) -> int | None:
        """Allocate a size-aligned range, from the range caches when possible; returns its
        start pfn or None. Sizes below 32 are rounded up to a power of two (as the kernel).
        On failure the caches are flushed and the allocation retried once."""
        if size < _FAST_ROUNDUP_BELOW:
            if size < 1:
                raise ValueError(f"size {size} < 1")
            size = 1 << (size - 1).bit_length()
        if not self._alive:
            self._check_alive()
        pfn = self._rcache.get(size, limit_pfn, cpu)
        if pfn is not None:
            self.stats["cache_hits"] += 1
            return pfn
        iova = self.alloc_iova(size, limit_pfn, True)
        if iova is None and flush_rcache:
            self.stats["cache_flushes"] += 1
            self.flush_rcaches()
            iova = self.alloc_iova(size, limit_pfn, True)
        return None if iova is None else iova.pfn_lo

    def free_iova_fast(self, pfn: int, size: int, cpu: int = 0) -> None:
        """Free a range from :meth:`alloc_iova_fast` (same pfn and size, not checked, as in the
        kernel): parked in the caches if its size is cacheable, else freed in the tree."""
        if not self._alive:
            self._check_alive()
        if not self._rcache.insert(pfn, size, cpu):
            self.free_iova(pfn)

    def flush_rcaches(self) -> None:
        """Return every cached range to the tree (all CPUs, then the depots)."""
        self._rcache.flush()

    def free_cpu_cached_iovas(self, cpu: int) -> None:
        """Return one CPU's cached ranges to the tree (CPU hot-unplug in the kernel)."""
        self._rcache.free_cpu(cpu)

    # ------------------------------------------------------------------ teardown

    def put_iova_domain(self) -> None:
        """Tear the domain down: drop the caches and the deferred queue, then release every
        entry in the tree exactly once (deferred and cached ones are still in it)."""
        self._check_alive()
        self._rcache.discard()
        self._deferred.clear()
        entries = list(self._tree)
        self._tree = RangeTree(self.max_pfn + 1)
        self.allocated_pfns = 0
        self._alive = False
        if self.on_release is not None:
            for iova in entries:
                self.on_release(iova)

    # ------------------------------------------------------------------ checking

    def check(self) -> None:
        """Verify the tree and the accounting (O(n); tests)."""
        self._tree.check()
        total = sum(i.size for i in self._tree)
        if total != self.allocated_pfns:
            raise AssertionError(f"allocated_pfns {self.allocated_pfns} != {total}")
        for pfn_lo, iova in self._deferred.items():
            if self._tree.find(pfn_lo) is not iova:
                raise AssertionError(f"deferred {iova!r} not in the tree")
        for pfn, order in self._rcache.cached():
            entry = self._tree.find(pfn)
            if entry is None or entry.pfn_lo != pfn or entry.size != 1 << order:
                raise AssertionError(f"cached pfn {pfn:#x} order {order} is not an entry")
