"""CBursts: the C TX/RX bursts at run time, for harness.virtio.fastpath (their C is burst.py's).

The only module that hands the bursts cffi objects: the device process gives a ``CBursts`` to
the net device (``VirtioNetDevice(bursts=...)``), which keeps the ring logic in
harness.virtio.fastpath and never imports ffi or lib itself. Each method is one step that needs
the extension: a view's host address (taken without holding a buffer export, so the view can
still be released), a region table, one queue's state struct with its ring addresses, a burst.
"""

from __future__ import annotations

import bisect
from typing import Any

from harness.vfu._vfu import ffi, lib

__all__ = ["CBursts", "RegionTable"]

_ROW = ffi.sizeof("harness_region_t")


class RegionTable:
    """The guest regions as C sees them: a ``harness_region_t[]`` sorted by iova, changed in
    place one region at a time (behind a vIOMMU every guest DMA mapping adds or removes one,
    thousands of them live: an insert or a removal is a binary search and one ``memmove``)."""

    def __init__(self, capacity: int = 64) -> None:
        self._rows = ffi.new("harness_region_t[]", capacity)
        self._iovas: list[int] = []  # the rows' iovas, for the binary search

    @property
    def c(self) -> Any:
        """The rows (``harness_region_t *``): valid until the next insert, which may move
        them; hand them to a queue just before each burst."""
        return self._rows

    def __len__(self) -> int:
        return len(self._iovas)

    def insert(self, iova: int, last: int, host: int, writable: bool) -> None:
        """Add the region [iova, last] with host memory at ``host`` (0: none)."""
        rows, n = self._rows, len(self._iovas)
        at = bisect.bisect_left(self._iovas, iova)
        if n == len(rows):
            grown = ffi.new("harness_region_t[]", 2 * n)
            ffi.memmove(grown, rows, n * _ROW)
            rows = self._rows = grown
        if at < n:
            ffi.memmove(rows + at + 1, rows + at, (n - at) * _ROW)
        slot = rows[at]
        slot.iova = iova
        slot.last = last
        slot.host = ffi.cast("uint8_t *", host)
        slot.writable = int(writable)
        self._iovas.insert(at, iova)

    def remove(self, iova: int) -> bool:
        """Drop the region starting at ``iova``; False: there is none."""
        iovas = self._iovas
        at = bisect.bisect_left(iovas, iova)
        if at == len(iovas) or iovas[at] != iova:
            return False
        rows = self._rows
        ffi.memmove(rows + at, rows + at + 1, (len(iovas) - at - 1) * _ROW)
        del iovas[at]
        return True

    def rows(self) -> list[tuple[int, int, int, bool]]:
        """(iova, last, host, writable) of every row, in order (for tests)."""
        r = self._rows
        return [(r[k].iova, r[k].last, int(ffi.cast("uintptr_t", r[k].host)), bool(r[k].writable))
                for k in range(len(self._iovas))]  # fmt: skip


class CBursts:
    """The bursts over the extension (harness.virtio.protocols.BurstEngine)."""

    def address(self, view: memoryview) -> int:
        """The host address of ``view``'s memory, holding no buffer export afterwards."""
        buf = ffi.from_buffer(view)
        try:
            return int(ffi.cast("uintptr_t", buf))
        finally:
            ffi.release(buf)

    def region_table(self) -> RegionTable:
        """An empty region table."""
        return RegionTable()

    def queue(self, desc: int, avail: int, used: int) -> Any:
        """A queue's state struct (harness_vq_t) over rings at these host addresses; its
        ``regions`` and ``nregions`` are the caller's to set before each burst."""
        c = ffi.new("harness_vq_t *")
        c.desc = ffi.cast("uint8_t *", desc)
        c.avail = ffi.cast("uint16_t *", avail)
        c.used = ffi.cast("uint32_t *", used)
        return c

    def tx(self, q: Any, budget: int) -> int:
        return lib.harness_tx_burst(q, budget)

    def rx(self, q: Any, budget: int) -> int:
        return lib.harness_rx_burst(q, budget)
