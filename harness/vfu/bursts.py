"""CBursts: the C TX/RX bursts at run time, for harness.virtio.fastpath (their C is burst.py's).

The only module that hands the bursts cffi objects: the device process gives a ``CBursts`` to
the net device (``VirtioNetDevice(bursts=...)``), which keeps the ring logic in
harness.virtio.fastpath and never imports ffi or lib itself. Each method is one step that needs
the extension: a view's host address (taken without holding a buffer export, so the view can
still be released), a region table, one queue's state struct with its ring addresses, a burst.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harness.vfu._vfu import ffi, lib

__all__ = ["CBursts"]


class CBursts:
    """The bursts over the extension (harness.virtio.protocols.BurstEngine)."""

    def address(self, view: memoryview) -> int:
        """The host address of ``view``'s memory, holding no buffer export afterwards."""
        buf = ffi.from_buffer(view)
        try:
            return int(ffi.cast("uintptr_t", buf))
        finally:
            ffi.release(buf)

    def regions(self, rows: Sequence[tuple[int, int, int, bool]]) -> Any:
        """A region table from (iova, last, host address or 0, writable), sorted by iova."""
        table = ffi.new("harness_region_t[]", max(1, len(rows)))
        for slot, (iova, last, host, writable) in zip(table, rows, strict=False):
            slot.iova = iova
            slot.last = last
            slot.host = ffi.cast("uint8_t *", host)
            slot.writable = int(writable)
        return table

    def queue(self, desc: int, avail: int, used: int, table: Any, nregions: int) -> Any:
        """A queue's state struct (harness_vq_t) over rings at these host addresses."""
        c = ffi.new("harness_vq_t *")
        c.desc = ffi.cast("uint8_t *", desc)
        c.avail = ffi.cast("uint16_t *", avail)
        c.used = ffi.cast("uint32_t *", used)
        c.regions = table
        c.nregions = nregions
        return c

    def tx(self, q: Any, budget: int) -> int:
        return lib.harness_tx_burst(q, budget)

    def rx(self, q: Any, budget: int) -> int:
        return lib.harness_rx_burst(q, budget)
