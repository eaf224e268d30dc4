"""The guest-IOVA observer: the guest's own IOVA allocator, checked from outside.

Behind a vIOMMU every mapping the guest's DMA API makes for our device reaches the server as a
vfio-user DMA_MAP, and every unmap as a DMA_UNMAP (libvfio-user calls back once per region, so
each unmap names one earlier map). From that stream alone this checks what iova.c promises:
no two live mappings overlap, every unmap matches a live mapping exactly, every mapping lies
below the device's DMA mask; and it reports what a developer of an allocator change wants to
see: the size histogram, peak live mappings, the lowest IOVA reached, how much of the space
stays 32-bit, and fragmentation over time (live span versus mapped bytes).

The stream has epochs: before the guest turns DMA remapping on, QEMU maps guest RAM 1:1 (a few
large regions from IOVA 0); when it turns it on, all of those are unmapped, and from then on
the mappings are the guest allocator's. Each time the live set empties an epoch ends; the
report describes the epoch with the most mappings (the guest's allocator at work), while the
checks and the totals cover the whole stream.

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
class Epoch:
    """What one stretch of the stream between two empty live sets showed."""

    maps: int = 0
    peak_live: int = 0
    lowest_iova: int | None = None
    highest_end: int = 0
    above_4g: int = 0
    multi_page: int = 0
    aligned_multi_page: int = 0
    histogram: dict[int, int] = field(default_factory=dict)  # size rounded up to 2^k -> count

    def as_dict(self) -> dict[str, object]:
        return {"epoch_maps": self.maps, "peak_live": self.peak_live,
                "lowest_iova": self.lowest_iova, "highest_end": self.highest_end,
                "above_4g": self.above_4g,
                "multi_page": self.multi_page, "aligned_multi_page": self.aligned_multi_page,
                "size_histogram": {str(k): v for k, v in sorted(self.histogram.items())}}


@dataclass
class GuestIovaObserver:
    dma_mask_bits: int = 64
    clock: Callable[[], float] = time.monotonic
    maps: int = 0
    unmaps: int = 0
    epochs: int = 1
    violations_total: int = 0
    violations: list[Violation] = field(default_factory=list)
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    _epoch: Epoch = field(default_factory=Epoch)
    _busiest: Epoch | None = None
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
        e = self._epoch
        e.maps += 1
        e.peak_live = max(e.peak_live, len(self._starts))
        e.lowest_iova = iova if e.lowest_iova is None else min(e.lowest_iova, iova)
        e.highest_end = max(e.highest_end, end)
        if end > 1 << 32:
            e.above_4g += 1
        bucket = 1 << max(size - 1, 0).bit_length()
        e.histogram[bucket] = e.histogram.get(bucket, 0) + 1
        if size > PAGE:
            e.multi_page += 1
            if iova % bucket == 0:
                e.aligned_multi_page += 1
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
        if not self._starts:  # the live set emptied: the epoch ends
            if self._busiest is None or self._epoch.maps > self._busiest.maps:
                self._busiest = self._epoch
            self._epoch = Epoch()
            self.epochs += 1

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

    @property
    def busiest(self) -> Epoch:
        """The epoch with the most mappings so far (the current one included)."""
        if self._busiest is None or self._epoch.maps > self._busiest.maps:
            return self._epoch
        return self._busiest

    def report(self) -> dict[str, object]:
        """JSON-ready: the checks' verdict, the busiest epoch and the samples over time."""
        worst = max(self.samples, key=lambda s: s[3] - s[2], default=None)
        return {
            "maps": self.maps, "unmaps": self.unmaps, "live": self.live, "epochs": self.epochs,
            **self.busiest.as_dict(),
            "violations_total": self.violations_total,
            "violations": [str(v) for v in self.violations],
            # (seconds, live mappings, live bytes, span from lowest start to highest end)
            "samples": self.samples[-200:],
            "most_fragmented": worst,
        }
