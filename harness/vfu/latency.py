"""Latency samples and their percentiles: how long the server took to answer DMA_MAP/UNMAP.

Under a vIOMMU every guest mapping is a vfio-user DMA_MAP or DMA_UNMAP during which QEMU's vCPU
waits for our reply, so this latency is on the guest's critical path. Two figures per message:

- ``callback``: inside our DMA callback (what the map callback itself costs);
- ``reply``: from the earliest moment the message can have arrived to the end of the callback
  (the library replies right after it). The server loop says when that is
  (:attr:`harness.vfu.context.VfuContext.message_origin`): the wake-up of a select() that
  blocked, otherwise the previous wake-up, because the message came in while the loop was busy
  with ring work. So ``reply`` is an upper bound that includes that ring work.

harness.vfu.dmaregs adds the parts of ``reply`` (``queue``, split by whether the loop slept,
and ``library``). ``callback`` is per region, the others per message: an unmap of a range that
holds several regions counts its wait once, at its first region.

Samples are kept in a bounded ring (the newest ``capacity``), so a long run costs fixed memory.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

__all__ = ["LatencyRecorder", "percentile"]

DEFAULT_CAPACITY = 1 << 16


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ascending values; None if empty.

    Nearest rank, not interpolation: p99 of 100 samples is the 99th smallest, a real sample."""
    if not sorted_values:
        return None
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} out of (0, 100]")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class LatencyRecorder:
    """Seconds per event, summarised in microseconds (count, p50, p99, max, mean)."""

    __slots__ = ("_next", "_samples", "capacity", "count", "total")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._samples = array("d")
        self._next = 0
        self.count = 0  # every sample ever added, also those the ring dropped
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        if len(self._samples) < self.capacity:
            self._samples.append(seconds)
        else:
            self._samples[self._next] = seconds
            self._next = (self._next + 1) % self.capacity

    def summary(self) -> dict[str, float | int | None]:
        """{count, p50_us, p99_us, max_us, mean_us} (percentiles over the kept samples)."""
        values = sorted(self._samples)

        def us(v: float | None) -> float | None:
            return None if v is None else round(v * 1e6, 1)

        return {"count": self.count, "p50_us": us(percentile(values, 50)),
                "p99_us": us(percentile(values, 99)),
                "max_us": us(values[-1] if values else None),
                "mean_us": us(self.total / self.count if self.count else None)}
