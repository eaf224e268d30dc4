"""DmaRegistry: one context's DMA regions as the device sees them, and each DMA_MAP/UNMAP's latency.

The bodies of libvfio-user's DMA register and unregister callbacks (reached through
harness.vfu.callbacks and VfuContext, inside vfu_run_ctx): each region the library registers
becomes a DmaRegion over its mapping, handed to the owner's ``on_map``; ``on_unmap`` gets the
same object back. Every callback is timed, its figures filed into ``latency`` after the reply
has gone (harness.vfu.latency says what they mean), and counted in ``events``. VfuContext
exposes those as ``dma_latency``, ``dma_events`` and ``message_origin``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from harness.vfu._vfu import ffi, lib
from harness.vfu.latency import LatencyRecorder
from harness.vfu.model import PROT_WRITE, DmaRegion

#: Timings noted before they are filed regardless (a bound, for callbacks outside vfu_run_ctx).
_UNFILED_MAX = 4096

# The context's messages, under the context's logger name (as before this module existed).
log = logging.getLogger("harness.vfu.context")


class DmaRegistry:
    """The regions libvfio-user registered, by (iova, size), and the DMA callbacks' latency."""

    def __init__(self) -> None:
        self.regions: dict[tuple[int, int], DmaRegion] = {}
        self.on_map: Callable[[DmaRegion], None] | None = None
        self.on_unmap: Callable[[DmaRegion], None] | None = None
        #: The earliest monotonic time the requests run() is about to handle can have arrived;
        #: the server loop sets it before each run() (harness.vfu.latency explains why).
        self.message_origin = 0.0
        #: Whether that origin is a wake-up the requests caused (the loop slept in select), not
        #: the previous wake-up of a loop that was busy with ring work when they came.
        self.message_woke = False
        #: DMA_MAP and DMA_UNMAP reply latency (origin -> end of callback) and callback time.
        #: ``*_queue``: origin -> the vfu_run_ctx call that handled it, also split by what the
        #: loop was doing: ``*_queue_woke`` (asleep: the wait is the handlers before ours in
        #: that wake-up) and ``*_queue_busy`` (at work: an upper bound that includes it);
        #: ``*_library``: that call's entry -> our callback (reading the message, mmap of its fd).
        self._latency = {f"{op}_{part}": LatencyRecorder() for op in ("map", "unmap")
                         for part in ("reply", "callback", "queue", "queue_woke", "queue_busy",
                                      "library")}
        #: ``map_apply``: on_map's work for one region, after the reply (apply_maps).
        self._latency["map_apply"] = LatencyRecorder()
        #: Regions mapped (and answered) but not yet handed to on_map (apply_maps).
        self._pending: list[DmaRegion] = []
        #: Told of an exception from on_map in apply_maps (VfuContext counts and logs it, as
        #: the callback trampolines do); None: it propagates.
        self.on_map_failed: Callable[[BaseException], None] | None = None
        #: Timings taken inside callbacks, not yet filed (file_latency): filing them is
        #: bookkeeping, and inside the callback it would delay the reply the guest waits for.
        self._unfiled: list[tuple[str, float, float, float, float, bool]] = []
        #: When the vfu_run_ctx call now running was entered (VfuContext sets it; its first
        #: DMA callback clears it).
        self.run_entry = 0.0
        #: DMA_MAP/UNMAP callbacks so far (the loop polls harder while this moves).
        self.events = 0

    @property
    def latency(self) -> dict[str, LatencyRecorder]:
        """The recorders by figure, every timing taken so far filed."""
        self.file_latency()
        return self._latency

    def clear(self) -> None:
        """Forget the regions and the owner's callbacks (the context is closed)."""
        self._pending.clear()
        self.regions.clear()
        self.on_map = self.on_unmap = None

    def _timed(self, kind: str, start: float) -> None:
        """Note a callback's timing (filed later: one clock read and an append here,
        on the way to the reply)."""
        end = time.monotonic()
        self.events += 1
        entry = self.run_entry
        # One message, one wait: an unmap of a whole range (at a reset, 400-odd regions
        # behind a vIOMMU) calls us once per region, and each later region's "library" part
        # would hold every callback before it (p99 3.6 ms in round 17's runs, all teardown).
        self.run_entry = 0.0
        unfiled = self._unfiled
        unfiled.append((kind, start, end, entry, self.message_origin, self.message_woke))
        if len(unfiled) >= _UNFILED_MAX:  # nobody filed for a long while (close, resets)
            self.file_latency()

    def file_latency(self) -> None:
        """File the timings the callbacks noted (VfuContext calls this after each
        vfu_run_ctx, once the reply is out)."""
        unfiled = self._unfiled
        if not unfiled:
            return
        lat = self._latency
        for kind, start, end, entry, origin, woke in unfiled:
            lat[kind + "_callback"].add(end - start)
            if entry <= 0:
                continue  # not the message's first region: its wait is counted
            lat[kind + "_library"].add(start - entry)
            if 0 < origin <= entry:
                lat[kind + "_reply"].add(end - origin)
                lat[kind + "_queue"].add(entry - origin)
                lat[kind + ("_queue_woke" if woke else "_queue_busy")].add(entry - origin)
        unfiled.clear()

    def register(self, info: Any) -> None:
        """The DMA register callback's body (``info`` is a vfu_dma_info_t *)."""
        start = time.monotonic()
        try:
            self._register(info)
        finally:
            self._timed("map", start)

    def _register(self, info: Any) -> None:
        iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
        size = int(info.iova.iov_len)
        prot = int(info.prot)
        if (iova, size) in self.regions:
            # The library answers a DMA_MAP of exactly a live region by returning that region
            # and calling us again: the device has it already. The new message's fd is left
            # open by the library; the client guard closes it.
            log.debug("DMA region [%#x, %#x) mapped again: already known", iova, iova + size)
            lib.harness_close_duplicate_map_fd()
            return
        view: memoryview | None = None
        # info is valid only now; vaddr already points at `iova` inside the page-aligned mmap
        # (info.mapping), so the view is exactly [vaddr, vaddr + size).
        if info.vaddr != ffi.NULL:
            view = memoryview(ffi.buffer(ffi.cast("uint8_t *", info.vaddr), size))
            if not prot & PROT_WRITE:
                # Writing through a read-only mapping would be a segfault, not an exception.
                view = view.toreadonly()
        region = DmaRegion(iova=iova, size=size, prot=prot, view=view)
        self.regions[(iova, size)] = region
        # The owner's work (guest memory, the device's tables, the checks) waits until the
        # library has replied: the callback returns nothing the reply could carry, and the
        # guest's vCPU waits for that reply. apply_maps runs after this vfu_run_ctx, before
        # the next message (the first that could use the region) and before any unmap.
        if self.on_map is not None:
            self._pending.append(region)

    def apply_maps(self) -> None:
        """Hand the regions mapped since the last call to ``on_map``, in order (VfuContext
        calls it after each vfu_run_ctx; an unmap calls it first)."""
        pending = self._pending
        while pending:
            region = pending.pop(0)
            if self.on_map is None:  # (only clear() unsets it, and clear() empties pending)
                continue
            start = time.monotonic()
            try:
                self.on_map(region)
            except BaseException as exc:
                if self.on_map_failed is None:
                    raise
                self.on_map_failed(exc)
            finally:
                self._latency["map_apply"].add(time.monotonic() - start)

    def unregister(self, info: Any) -> None:
        """The DMA unregister callback's body (``info`` is a vfu_dma_info_t *)."""
        start = time.monotonic()
        try:
            self._unregister(info)
        finally:
            self._timed("unmap", start)

    def _unregister(self, info: Any) -> None:
        if self._pending:
            self.apply_maps()  # the owner sees a region mapped before it sees it go
        iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
        size = int(info.iova.iov_len)
        region = self.regions.pop((iova, size), None)
        if region is None:
            region = DmaRegion(iova=iova, size=size, prot=int(info.prot), view=None)
        try:
            if self.on_unmap is not None:
                self.on_unmap(region)
        finally:
            if region.view is not None:
                # Best effort: views derived from it survive this, hence the on_unmap contract.
                try:
                    region.view.release()
                except BufferError:
                    log.warning(
                        "DMA region [%#x, %#x) still exported after on_unmap", iova, iova + size
                    )
