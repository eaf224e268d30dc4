"""DmaLedger: a MapOps decorator that audits every DMA operation the device performs.

It sits on top of the real map ops (direct or bounce, possibly with fault injection below it)
and checks, for each operation, what an IOMMU plus Linux's DMA-debug would:

- map: Bus Master Enable is set; the mapping direction agrees with the descriptor's WRITE flag;
  the IOVA translates (a registered, accessible region); the whole access lies inside that one
  region; a device-writable mapping (FROM_DEVICE/BIDIRECTIONAL) is in a writable region.
- sync: the handle is live, not revoked, synced in its own direction, with BME set.
- unmap/free: the handle is live (unknown handles, double unmaps and unmaps of failed maps are
  caught before they reach the implementation), in its own direction.
- leaks: :meth:`DmaLedger.check_leaks` at reset and at exit: every mapping still live is one.
- regions: :meth:`DmaLedger.check_regions` compares libvfio-user's region list with the domain.

``map_sg`` (one buffer in pieces, as ``harness.dma.mapops.map_pieces``) runs the same checks
per piece with one region lookup for the split and the checks together, and maps through
``DirectMapOps.map_in_region`` (no second lookup); any piece that would be refused goes
through ``map_page`` itself, so refusals, their order, words and counters are map_page's.
``unmap_sg`` (a chain's handles, as ``harness.dma.mapops.unmap_pieces``) is the mirror: over
direct mapping, each handle's unmap checks and the direct unmap in one loop; a handle that
would be refused or reported goes through ``unmap_page`` itself.

Every violation is counted by kind and logged with queue, descriptor and IOVA. A violation the
guest caused (an address, length or protection it supplied) fails the map non-transiently, so
the virtqueue sets NEEDS_RESET with a config interrupt; BME off fails it transiently (the device
must stop DMA until the guest sets it again, not reset). Violations the device itself commits
(bad unmaps, syncs) are counted and logged, never raised into the data path.

Layout: the checks above are :class:`harness.dma.ledger_ops.AuditedMapOps`'s, and the violation
kinds are defined there (re-exported here); :class:`DmaLedger` extends it with the server
hooks: ``live``, ``housekeeping``, ``settle``, the leak and region checks and ``stats``.
"""

from __future__ import annotations

from collections.abc import Iterable

from harness.dma.ledger_ops import (
    BUS_MASTER_OFF,
    DESCRIPTOR_DIRECTION,
    DIRECTION_MISMATCH,
    DOUBLE_UNMAP,
    LEAK,
    MAP_REFUSED,
    OUT_OF_BOUNDS,
    READ_ONLY_REGION,
    REGION_MISMATCH,
    TOO_LARGE,
    UNKNOWN_UNMAP,
    UNMAP_FAILED_HANDLE,
    UNMAPPED_IOVA,
    USE_AFTER_REVOKE,
    USE_AFTER_UNMAP,
    AuditedMapOps,
)

__all__ = ["BUS_MASTER_OFF", "DESCRIPTOR_DIRECTION", "DIRECTION_MISMATCH", "DOUBLE_UNMAP", "LEAK",
           "MAP_REFUSED", "OUT_OF_BOUNDS", "READ_ONLY_REGION", "REGION_MISMATCH", "TOO_LARGE",
           "UNKNOWN_UNMAP", "UNMAPPED_IOVA", "UNMAP_FAILED_HANDLE", "USE_AFTER_REVOKE",
           "USE_AFTER_UNMAP", "DmaLedger"]


class DmaLedger(AuditedMapOps):
    """Audit wrapper around ``inner`` (see the module docstring). Implements MapOps."""

    # ---- server hooks ------------------------------------------------------------------------

    @property
    def live(self) -> int:
        """Mappings and coherent allocations currently live."""
        return len(self._live)

    def housekeeping(self) -> None:
        """Once per server loop turn: lets the layers below do deferred work."""
        hook = getattr(self.inner, "housekeeping", None)
        if hook is not None:
            hook()

    def settle(self, rounds: int = 64) -> None:
        """At exit, after the final reset: run the deferred work of the layers below until
        it is done, as the kernel flushes its delayed work before a domain goes away. Bounded:
        an erase that fails ``rounds`` times in a row (an injected failure rate near 1) stays
        pending and shows in the stats."""
        for _ in range(rounds):
            self.housekeeping()

    def check_leaks(self, when: str) -> int:
        """Every mapping still live is a leak (call after a device reset, and at exit after the
        final reset). Each is counted, logged and reclaimed; returns how many."""
        leaked = sorted(self._live, key=lambda h: (h.iova, h.addr))
        for h in leaked:
            self.violation(LEAK, h.iova, h.size, h.ctx, f"still mapped at {when}")
            if h.iova < 0:  # a coherent allocation (map_page never succeeds below 0)
                self.free(h)
            else:
                self.unmap_page(h, h.direction)
        return len(leaked)

    def check_region(self, iova: int, size: int, *, present: bool) -> bool:
        """O(log n) check after one DMA map (``present``) or unmap event from libvfio-user:
        the domain holds exactly that region, or nothing at ``iova`` any more."""
        self.region_checks += 1
        region = self.memory.lookup(iova)
        if present:
            ok = region is not None and region.iova == iova and region.size == size
        else:
            ok = region is None
        if not ok:
            got = "nothing" if region is None else f"{region.iova:#x}+{region.size:#x}"
            self.violation(
                REGION_MISMATCH, iova, size, None,
                f"after {'map' if present else 'unmap'} of {iova:#x}+{size:#x} domain has {got}",
            )  # fmt: skip
        return ok

    def check_regions(self, expected: Iterable[tuple[int, int]]) -> bool:
        """Whether the guest memory domain holds exactly the ``(iova, size)`` regions that
        libvfio-user has; a difference is a violation, logged with the first differences."""
        self.region_checks += 1
        want = sorted(set(expected))
        have = [(i, s) for i, s, _w in self.memory.regions()]
        if want == have:
            return True
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        self.violation(
            REGION_MISMATCH, missing[0][0] if missing else extra[0][0] if extra else -1, 0, None,
            f"{len(missing)} missing from the domain {_fmt(missing)}, "
            f"{len(extra)} stale in it {_fmt(extra)}",
        )  # fmt: skip
        return False

    def stats(self) -> dict[str, object]:
        """Counters for the run summary (JSON-ready)."""
        elapsed = max(self._clock() - self._started, 1e-9)
        out: dict[str, object] = {
            "maps": self.maps,
            "unmaps": self.unmaps,
            "coherent_maps": self.coherent_maps,
            "map_bytes": self.map_bytes,
            "syncs_for_cpu": self.syncs_for_cpu,
            "syncs_for_device": self.syncs_for_device,
            "allocs": self.allocs,
            "frees": self.frees,
            "failed_maps": self.failed_maps,
            "live": len(self._live),
            "peak_live": self.peak_live,
            "elapsed_s": round(elapsed, 3),
            "maps_per_s": round(self.maps / elapsed, 1),
            "unmaps_per_s": round(self.unmaps / elapsed, 1),
            "violations": dict(self.violations),
            "violations_total": sum(self.violations.values()),
            "checks": self.checks,
            "revocations": self.memory.revocations,
            "revoked_handles": self.memory.revoked_handles,
            "region_checks": self.region_checks,
            "iova_space": self.memory.fragmentation(),
        }
        layer: object = self.inner
        while layer is not None:  # the layers below report their own counters
            layer_stats = getattr(layer, "stats", None)
            if layer_stats is not None:
                s = layer_stats()
                key = "faults" if "injected" in s else "mapops"
                out[key] = s
            layer = getattr(layer, "inner", None)
        return out


def _fmt(pairs: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"{i:#x}+{s:#x}" for i, s in pairs[:4])
    return f"[{shown}{', ...' if len(pairs) > 4 else ''}]"
