"""The IOVA range caches: per-CPU magazines plus a depot, as Linux ``iova_rcache``.

Freed ranges of up to ``2 ** (IOVA_RANGE_CACHE_MAX_SIZE - 1)`` pages are parked here, still
allocated in the tree, and handed out again without touching the tree. One cache per size order
(0..5), each with per-CPU ``loaded``/``prev`` magazines of ``IOVA_MAG_SIZE`` pfns and a depot of
full magazines shared by all CPUs.

Deliberate differences from the kernel:

* "CPU" is an index the caller passes; there is no preemption or locking (pure logic).
* The depot is bounded at ``MAX_GLOBAL_MAGS`` magazines, as before Linux 6.7; a full depot
  frees the loaded magazine's pfns back to the tree instead of the kernel's newer delayed work
  that trims an unbounded depot. The outcome (bounded cache, pfns returned) is the same without
  a timer.
* A magazine is a Python list; "no pfn" is None rather than pfn 0.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["IOVA_MAG_SIZE", "IOVA_RANGE_CACHE_MAX_SIZE", "MAX_GLOBAL_MAGS", "RangeCache"]

IOVA_RANGE_CACHE_MAX_SIZE = 6  # log2 of the largest cached range, plus one: orders 0..5
IOVA_MAG_SIZE = 127
MAX_GLOBAL_MAGS = 32


class _CpuCache:
    __slots__ = ("loaded", "prev")

    def __init__(self) -> None:
        self.loaded: list[int] = []
        self.prev: list[int] = []


class RangeCache:
    """Magazines and depots for ``ncpus`` CPUs; ``free_pfn`` returns a pfn to the tree."""

    def __init__(self, ncpus: int, free_pfn: Callable[[int], None]) -> None:
        if ncpus < 1:
            raise ValueError("ncpus must be >= 1")
        self.ncpus = ncpus
        self._free_pfn = free_pfn
        # Indexed [cpu][order] so the hot path is two list subscripts.
        self._cpus = [[_CpuCache() for _ in range(IOVA_RANGE_CACHE_MAX_SIZE)] for _ in range(ncpus)]
        self._depots: list[list[list[int]]] = [[] for _ in range(IOVA_RANGE_CACHE_MAX_SIZE)]

    def get(self, size: int, limit_pfn: int, cpu: int = 0) -> int | None:
        """Pop a cached pfn of a ``size``-page range ending at or below ``limit_pfn``."""
        order = (size - 1).bit_length()
        if order >= IOVA_RANGE_CACHE_MAX_SIZE:
            return None
        cc = self._cpus[cpu][order]
        mag = cc.loaded
        if not mag:
            if cc.prev:
                cc.loaded, cc.prev = cc.prev, mag
                mag = cc.loaded
            else:
                depot = self._depots[order]
                if not depot:
                    return None
                mag = cc.loaded = depot.pop()
        highest = limit_pfn - size + 1
        pfn = mag[-1]
        if pfn <= highest:
            return mag.pop()
        # "Try harder": the top pfn is too high for this limit, look for any fitting one.
        for i in range(len(mag) - 2, -1, -1):
            pfn = mag[i]
            if pfn <= highest:
                mag[i] = mag[-1]
                mag.pop()
                return pfn
        return None

    def insert(self, pfn: int, size: int, cpu: int = 0) -> bool:
        """Park a freed range; False if the size is not cacheable (caller frees it)."""
        order = (size - 1).bit_length()
        if order >= IOVA_RANGE_CACHE_MAX_SIZE:
            return False
        cc = self._cpus[cpu][order]
        mag = cc.loaded
        if len(mag) < IOVA_MAG_SIZE:
            mag.append(pfn)
            return True
        if len(cc.prev) < IOVA_MAG_SIZE:
            cc.loaded, cc.prev = cc.prev, mag
            cc.loaded.append(pfn)
            return True
        depot = self._depots[order]
        if len(depot) < MAX_GLOBAL_MAGS:
            depot.append(mag)
        else:
            self._free_mag(mag)
        cc.loaded = [pfn]
        return True

    def _free_mag(self, mag: list[int]) -> None:
        for pfn in mag:
            self._free_pfn(pfn)
        mag.clear()

    def free_cpu(self, cpu: int) -> None:
        """Return one CPU's magazines to the tree (``free_cpu_cached_iovas``)."""
        for cc in self._cpus[cpu]:
            self._free_mag(cc.loaded)
            self._free_mag(cc.prev)

    def free_global(self) -> None:
        """Return the depots to the tree (``free_global_cached_iovas``)."""
        for depot in self._depots:
            while depot:
                self._free_mag(depot.pop())

    def flush(self) -> None:
        """Return everything cached to the tree."""
        for cpu in range(self.ncpus):
            self.free_cpu(cpu)
        self.free_global()

    def discard(self) -> None:
        """Forget every cached pfn without freeing it (teardown frees the tree wholesale)."""
        for per_cpu in self._cpus:
            for cc in per_cpu:
                cc.loaded.clear()
                cc.prev.clear()
        for depot in self._depots:
            depot.clear()

    def cached(self) -> list[tuple[int, int]]:
        """Every cached ``(pfn, order)`` (for tests and accounting)."""
        out: list[tuple[int, int]] = []
        for per_cpu in self._cpus:
            for order, cc in enumerate(per_cpu):
                out += [(p, order) for p in cc.loaded + cc.prev]
        for order, depot in enumerate(self._depots):
            for mag in depot:
                out += [(p, order) for p in mag]
        return out
