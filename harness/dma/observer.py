"""The guest-IOVA observer: the guest's own IOVA allocator, checked from outside.

Behind a vIOMMU every mapping the guest's DMA API makes for our device reaches the server as a
vfio-user DMA_MAP, and every unmap as a DMA_UNMAP (libvfio-user calls back once per region, so
each unmap names one earlier map). From that stream alone this checks what iova.c promises:
no two live mappings overlap, every unmap matches a live mapping exactly, every mapping lies
below the device's DMA mask; and it reports what a developer of an allocator change wants to
see: the size histogram, peak live mappings, the lowest IOVA reached, how much of the space
stays 32-bit, and fragmentation over time (live span versus mapped bytes).

What the stream can show of iova.c's size alignment: QEMU's intel-iommu notifies per page
range that the guest maps, so a multi-page mapping arrives as one region whose start can be
checked for alignment to its size rounded up to a power of two (`aligned_multi_page`).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PAGE = 4096
MAX_VIOLATIONS_KEPT = 50
SAMPLE_EVERY = 0.5  # seconds


@dataclass
class Violation:
    kind: str  # "overlap", "unmatched_unmap", "above_mask", "zero_size", "wraps"
    iova: int
    size: int
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} [{self.iova:#x}, +{self.size:#x}): {self.detail}"


@dataclass
class GuestIovaObserver:
    dma_mask_bits: int = 64
    clock: Callable[[], float] = time.monotonic
    maps: int = 0
    unmaps: int = 0
    peak_live: int = 0
    lowest_iova: int | None = None
    highest_end: int = 0
    above_4g: int = 0
    multi_page: int = 0
    aligned_multi_page: int = 0
    violations_total: int = 0
    violations: list[Violation] = field(default_factory=list)
    histogram: dict[int, int] = field(default_factory=dict)  # size rounded up to 2^k -> count
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)  # sorted live starts
    _sizes: dict[int, int] = field(default_factory=dict)  # live start -> size
    _live_bytes: int = 0
    _t0: float | None = None
    _next_sample: float = 0.0

    def _violate(self, v: Violation) -> None:
        self.violations_total += 1
        if len(self.violations) < MAX_VIOLATIONS_KEPT:
            self.violations.append(v)

    def mapped(self, iova: int, size: int) -> None:
        self.maps += 1
        if size <= 0:
            self._violate(Violation("zero_size", iova, size, "a mapping of no bytes"))
            return
        end = iova + size
        if end > 1 << 64:
            self._violate(Violation("wraps", iova, size, "the range wraps past 2^64"))
            return
        if end > 1 << self.dma_mask_bits:
            self._violate(Violation("above_mask", iova, size,
                                    f"ends above the {self.dma_mask_bits}-bit DMA mask"))
        i = bisect.bisect_left(self._starts, iova)
        for j in (i - 1, i):
            if 0 <= j < len(self._starts):
                s = self._starts[j]
                if s < end and iova < s + self._sizes[s]:
                    self._violate(Violation("overlap", iova, size,
                                            f"overlaps live [{s:#x}, +{self._sizes[s]:#x})"))
                    return
        self._starts.insert(i, iova)
        self._sizes[iova] = size
        self._live_bytes += size
        self.peak_live = max(self.peak_live, len(self._starts))
        self.lowest_iova = iova if self.lowest_iova is None else min(self.lowest_iova, iova)
        self.highest_end = max(self.highest_end, end)
        if end > 1 << 32:
            self.above_4g += 1
        bucket = 1 << max(size - 1, 0).bit_length()
        self.histogram[bucket] = self.histogram.get(bucket, 0) + 1
        if size > PAGE:
            self.multi_page += 1
            if iova % bucket == 0:
                self.aligned_multi_page += 1
        self._sample()

    def unmapped(self, iova: int, size: int) -> None:
        self.unmaps += 1
        if self._sizes.get(iova) != size:
            live = self._sizes.get(iova)
            why = "no live mapping starts there" if live is None else f"the live one is {live:#x}"
            self._violate(Violation("unmatched_unmap", iova, size, why))
            return
        del self._sizes[iova]
        self._starts.pop(bisect.bisect_left(self._starts, iova))
        self._live_bytes -= size
        self._sample()

    def _sample(self) -> None:
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
        if now < self._next_sample:
            return
        self._next_sample = now + SAMPLE_EVERY
        span = (self._starts[-1] + self._sizes[self._starts[-1]] - self._starts[0]
                if self._starts else 0)
        self.samples.append((round(now - self._t0, 3), len(self._starts), self._live_bytes,
                             span))

    @property
    def live(self) -> int:
        return len(self._starts)

    def report(self) -> dict[str, object]:
        """JSON-ready: the checks' verdict, the histogram and the samples over time."""
        worst = max(self.samples, key=lambda s: s[3] - s[2], default=None)
        return {
            "maps": self.maps, "unmaps": self.unmaps, "live": self.live,
            "peak_live": self.peak_live,
            "lowest_iova": self.lowest_iova, "highest_end": self.highest_end,
            "above_4g": self.above_4g,
            "size_histogram": {str(k): v for k, v in sorted(self.histogram.items())},
            "multi_page": self.multi_page, "aligned_multi_page": self.aligned_multi_page,
            "violations_total": self.violations_total,
            "violations": [str(v) for v in self.violations],
            # (seconds, live mappings, live bytes, span from lowest start to highest end)
            "samples": self.samples[-200:],
            "most_fragmented": worst,
        }
