"""The checking half of :class:`harness.dma.ledger.DmaLedger`: the audited map operations.

:class:`AuditedMapOps` wraps the real map ops and checks every map, sync, unmap, alloc and free
the device performs (the checks, and what each violation does to the data path, are listed in
:mod:`harness.dma.ledger`'s docstring), counting each violation by kind. The violation kinds
are defined here. :class:`~harness.dma.ledger.DmaLedger` extends it with the server's hooks
(leak and region checks, ``settle``, ``stats``); use that class, not this one.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from harness.dma.errors import DmaFault
from harness.dma.mapops import (
    ATTR_COHERENT,
    Direction,
    DirectMapOps,
    DmaHandle,
    MapCtx,
    MapOps,
    SgMapper,
    SgUnmapper,
    failed_handle,
    map_pieces,
    sg_mapper,
    sg_unmapper,
    unmap_pieces,
)
from harness.dma.memory import GuestMemory

log = logging.getLogger("harness.dma.ledger")  # the ledger's logger name, as before the split

_DESC_F_WRITE = 2  # VRING_DESC_F_WRITE (harness.dma must not depend on harness.virtio)
# Enum members as module constants: Direction.X is an attribute lookup costing ~50 ns on 3.11.
_TO_DEVICE = Direction.TO_DEVICE
_FROM_DEVICE = Direction.FROM_DEVICE
_LOG_PER_KIND = 20  # then only debug: a broken guest must not flood the log

# Violation kinds.
BUS_MASTER_OFF = "bus_master_off"
DESCRIPTOR_DIRECTION = "descriptor_direction"
UNMAPPED_IOVA = "unmapped_iova"
OUT_OF_BOUNDS = "out_of_bounds"
READ_ONLY_REGION = "read_only_region"
TOO_LARGE = "too_large"
MAP_REFUSED = "map_refused"
DOUBLE_UNMAP = "double_unmap"
UNKNOWN_UNMAP = "unknown_unmap"
UNMAP_FAILED_HANDLE = "unmap_failed_handle"
DIRECTION_MISMATCH = "direction_mismatch"
USE_AFTER_UNMAP = "use_after_unmap"
USE_AFTER_REVOKE = "use_after_revoke"
LEAK = "leak"
REGION_MISMATCH = "region_mismatch"


class AuditedMapOps:
    """The audited MapOps of :class:`~harness.dma.ledger.DmaLedger` (its only subclass)."""

    def __init__(
        self,
        inner: MapOps,
        memory: GuestMemory,
        *,
        bus_master: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
        checks: bool = True,
    ) -> None:
        self.inner = inner
        #: False: a pass-through that checks and counts nothing (only to measure what the
        #: checks cost: ``harness bench net``'s ledger-off side, HARNESS_LEDGER=off).
        self.checks = checks
        self.memory = memory
        self.bus_master = bus_master
        self._clock = clock
        self._started = clock()
        self._live: set[DmaHandle] = set()
        self.maps = 0
        self.coherent_maps = 0
        self.unmaps = 0
        self.map_bytes = 0
        self.syncs_for_cpu = 0
        self.syncs_for_device = 0
        self.allocs = 0
        self.frees = 0
        self.failed_maps = 0  # transient failures (injected, bounce space): retried later
        self.peak_live = 0
        self.region_checks = 0
        self.violations: Counter[str] = Counter()
        memory.on_revoke = self._on_revoke
        # The fused map_sg needs a layer below that maps a region it is handed, in the memory
        # the ledger looks up (direct mapping); over bounce or fault injection it is
        # map_pieces, the per-piece map_page path.
        region_map = getattr(inner, "map_in_region", None)
        if getattr(inner, "memory", None) is not memory:
            region_map = None
        self._region_map = region_map
        # Direct mapping's max_mapping_size is fixed at its construction.
        self._region_max = inner.max_mapping_size() if region_map is not None else 0
        self.map_sg: SgMapper = (
            self._map_sg_fused if region_map is not None else self._map_sg_pieces
        )
        # The fused unmap_sg does DirectMapOps.unmap_page's work itself: only over exactly
        # that class (a subclass may unmap differently), in the memory the ledger audits.
        direct = type(inner) is DirectMapOps and getattr(inner, "memory", None) is memory
        self.unmap_sg: SgUnmapper = (
            self._unmap_sg_direct if direct else self._unmap_sg_pieces
        )
        if not checks:
            self.map_sg = sg_mapper(inner)
            self.unmap_sg = sg_unmapper(inner)
            # Instance attributes shadow the checking methods: the data path calls the
            # layer below directly, as if there were no ledger.
            for name in ("map_page", "unmap_page", "sync_single_for_cpu",
                         "sync_single_for_device", "alloc", "free"):
                setattr(self, name, getattr(inner, name))

    # ---- violations --------------------------------------------------------------------------

    def violation(
        self, kind: str, iova: int, size: int, ctx: MapCtx | None, detail: str = ""
    ) -> None:
        """Count and log one violation (public: the server reports region mismatches here)."""
        self.violations[kind] += 1
        n = self.violations[kind]
        level = logging.WARNING if n <= _LOG_PER_KIND else logging.DEBUG
        if log.isEnabledFor(level):
            queue, desc = (ctx[0], ctx[1]) if ctx is not None else ("-", -1)
            log.log(
                level, "DMA violation %s: queue %s desc %d iova %#x len %#x%s%s",
                kind, queue, desc, iova, size, ": " if detail else "", detail,
            )  # fmt: skip

    def _refuse(
        self, kind: str, iova: int, size: int, direction: Direction, ctx: MapCtx | None,
        reason: str, *, transient: bool = False,
    ) -> DmaHandle:  # fmt: skip
        self.violation(kind, iova, size, ctx, reason)
        fault = DmaFault(iova, size, f"{kind}: {reason}", transient=transient)
        return failed_handle(iova, size, direction, fault, ctx)

    def _on_revoke(self, h: DmaHandle) -> None:
        # Still "live" for pairing: the device must unmap it (the unmap is then legitimate).
        log.debug("revoked mapping iova %#x+%#x ctx %s", h.iova, h.size, h.ctx)

    # ---- map ops -----------------------------------------------------------------------------

    def map_page(
        self, iova: int, size: int, direction: Direction, attrs: int = 0,
        ctx: MapCtx | None = None,
    ) -> DmaHandle:  # fmt: skip
        if not self.bus_master():
            return self._refuse(BUS_MASTER_OFF, iova, size, direction, ctx,
                                "DMA with Bus Master Enable clear", transient=True)  # fmt: skip
        if ctx is not None and ctx[2] >= 0:
            want = Direction.FROM_DEVICE if ctx[2] & _DESC_F_WRITE else Direction.TO_DEVICE
            if direction != want:
                return self._refuse(DESCRIPTOR_DIRECTION, iova, size, direction, ctx,
                                    f"mapped {direction.name} for flags {ctx[2]:#x}")  # fmt: skip
        region = self.memory.lookup(iova)
        if region is None or region.view is None:
            return self._refuse(
                UNMAPPED_IOVA, iova, size, direction, ctx, "no guest memory region translates it"
            )
        if size < 0 or iova + size > region.end:
            why = f"past the end of region {region.iova:#x}+{region.size:#x}"
            return self._refuse(OUT_OF_BOUNDS, iova, size, direction, ctx, why)
        if direction != Direction.TO_DEVICE and not region.writable:
            return self._refuse(READ_ONLY_REGION, iova, size, direction, ctx,
                                f"device write into read-only region {region.iova:#x}")  # fmt: skip
        if not attrs & ATTR_COHERENT and size > self.inner.max_mapping_size():
            why = f"beyond max_mapping_size {self.inner.max_mapping_size():#x}"
            return self._refuse(TOO_LARGE, iova, size, direction, ctx, why)
        h = self.inner.map_page(iova, size, direction, attrs, ctx)
        err = h.error
        if err is not None:
            if err.transient:
                self.failed_maps += 1
            else:
                self.violation(MAP_REFUSED, iova, size, ctx, err.reason)
            return h
        self.maps += 1
        if attrs & ATTR_COHERENT:
            self.coherent_maps += 1
        self.map_bytes += size
        live = self._live
        live.add(h)
        if len(live) > self.peak_live:
            self.peak_live = len(live)
        return h

    def _map_sg_pieces(
        self, out: list[DmaHandle], iova: int, length: int, direction: Direction, attrs: int,
        ctx: MapCtx | None, max_map: int,
    ) -> DmaHandle | None:  # fmt: skip
        return map_pieces(self, out, iova, length, direction, attrs, ctx, max_map)

    def _map_sg_fused(
        self, out: list[DmaHandle], iova: int, length: int, direction: Direction, attrs: int,
        ctx: MapCtx | None, max_map: int,
    ) -> DmaHandle | None:  # fmt: skip
        """map_pieces(self, ...) with one lookup per piece: the same pieces (split where
        ``contiguous`` would), every map_page check per piece; a piece failing any check is
        handed to map_page, which refuses it in its own order and words."""
        lookup = self.memory.lookup
        region_map = self._region_map
        assert region_map is not None
        bus_master = self.bus_master
        inner_max = self._region_max
        want = direction
        if ctx is not None and ctx[2] >= 0:
            want = _FROM_DEVICE if ctx[2] & _DESC_F_WRITE else _TO_DEVICE
        writes = direction != _TO_DEVICE
        live = self._live
        while True:
            n = length if length <= max_map else max_map
            region = lookup(iova)
            if region is not None and iova + n > region.end:
                n = region.end - iova  # what contiguous() answers
            if (region is None or region.view is None or not bus_master() or want != direction
                    or (writes and not region.writable)
                    or (n > inner_max and not attrs & ATTR_COHERENT)):  # fmt: skip
                h = self.map_page(iova, n, direction, attrs, ctx)
                if h.error is not None:
                    return h
            else:
                h = region_map(region, iova, n, direction, attrs, ctx)
                self.maps += 1
                if attrs & ATTR_COHERENT:
                    self.coherent_maps += 1
                self.map_bytes += n
                live.add(h)
                if len(live) > self.peak_live:
                    self.peak_live = len(live)
            out.append(h)
            length -= n
            if not length:
                return None
            iova += n

    def account_transient(self, pieces: int, nbytes: int, most: int) -> None:
        """Count mappings a fast path made and unmapped within one call, every check of
        ``_map_sg_fused`` and ``_unmap_sg_direct`` passed (harness.virtio.fastpath): ``pieces``
        maps and as many unmaps of ``nbytes`` in all, at most ``most`` live at once on top of
        the mappings live now."""
        self.maps += pieces
        self.unmaps += pieces
        self.map_bytes += nbytes
        peak = len(self._live) + most
        if peak > self.peak_live:
            self.peak_live = peak

    def _check_use(self, h: DmaHandle, direction: Direction, what: str) -> bool:
        if h not in self._live:
            kind = USE_AFTER_UNMAP if h.unmapped else UNKNOWN_UNMAP
            self.violation(kind, h.iova, h.size, h.ctx, f"{what} of a handle that is not live")
            return False
        if h.revoked:
            self.violation(
                USE_AFTER_REVOKE, h.iova, h.size, h.ctx, f"{what} after its region was removed"
            )
            return False
        if direction != h.direction:
            self.violation(
                DIRECTION_MISMATCH,
                h.iova,
                h.size,
                h.ctx,
                f"{what} {direction.name} of a {h.direction.name} mapping",
            )
        if not self.bus_master():
            self.violation(BUS_MASTER_OFF, h.iova, h.size, h.ctx, f"{what} with BME clear")
        return True

    def sync_single_for_cpu(self, handle: DmaHandle, direction: Direction) -> None:
        if self._check_use(handle, direction, "sync_single_for_cpu"):
            self.syncs_for_cpu += 1
            self.inner.sync_single_for_cpu(handle, direction)

    def sync_single_for_device(self, handle: DmaHandle, direction: Direction) -> None:
        if self._check_use(handle, direction, "sync_single_for_device"):
            self.syncs_for_device += 1
            self.inner.sync_single_for_device(handle, direction)

    def unmap_page(self, handle: DmaHandle, direction: Direction) -> None:
        live = self._live
        if handle not in live:
            if handle.error is not None:
                kind = UNMAP_FAILED_HANDLE
            elif handle.unmapped:
                kind = DOUBLE_UNMAP
            else:
                kind = UNKNOWN_UNMAP
            self.violation(kind, handle.iova, handle.size, handle.ctx, "unmap refused")
            return
        live.remove(handle)
        if direction != handle.direction:
            self.violation(
                DIRECTION_MISMATCH,
                handle.iova,
                handle.size,
                handle.ctx,
                f"unmap {direction.name} of a {handle.direction.name} mapping",
            )
            direction = handle.direction  # unmap as mapped, or bounced data would be lost
        self.unmaps += 1
        self.inner.unmap_page(handle, direction)

    def _unmap_sg_pieces(self, handles: list[DmaHandle], direction: Direction) -> None:
        unmap_pieces(self, handles, direction)

    def _unmap_sg_direct(self, handles: list[DmaHandle], direction: Direction) -> None:
        """unmap_pieces(self, ...) over DirectMapOps in one loop: a live handle unmapped in
        its own direction is removed, counted and unmapped as ``DirectMapOps.unmap_page``
        does (flag, unregister, release both views); any other (not live: refused, counted;
        wrong direction: reported) goes through ``unmap_page``, in the list's order."""
        live = self._live
        done = 0
        try:
            for h in handles:
                if h not in live or h.direction != direction:
                    self.unmap_page(h, direction)
                    continue
                live.remove(h)
                done += 1
                if h.unmapped:  # what DirectMapOps.unmap_page does with one: nothing
                    continue
                h.unmapped = True
                region = h.region
                if region is not None:  # harness.dma.mapops.unregister
                    region.live.discard(h)
                    h.region = None
                # harness.dma.memory.release, for the view and the guest view under it
                try:  # noqa: SIM105
                    h.view.release()
                except BufferError:
                    pass
                guest = h.guest
                if guest is not None:
                    try:  # noqa: SIM105
                        guest.release()
                    except BufferError:
                        pass
        finally:
            self.unmaps += done

    def alloc(self, size: int) -> DmaHandle:
        h = self.inner.alloc(size)
        if h.error is None:
            self.allocs += 1
            self._live.add(h)
            self.peak_live = max(self.peak_live, len(self._live))
        else:
            self.failed_maps += 1
        return h

    def free(self, handle: DmaHandle) -> None:
        if handle not in self._live:
            kind = DOUBLE_UNMAP if handle.unmapped else UNKNOWN_UNMAP
            self.violation(kind, handle.iova, handle.size, handle.ctx, "free refused")
            return
        self._live.remove(handle)
        self.frees += 1
        self.inner.free(handle)

    def need_sync(self, handle: DmaHandle) -> bool:
        return self.inner.need_sync(handle)

    def mapping_error(self, handle: DmaHandle) -> bool:
        return handle.error is not None

    def max_mapping_size(self) -> int:
        return self.inner.max_mapping_size()

    def contiguous(self, iova: int, size: int) -> int:
        return self.inner.contiguous(iova, size)
