"""TxFast: the split ring's TX loop in C for the chains every check passes (issue 12).

The device's TX flush (``VirtioNetDevice._tx_flush``) hands each burst to ``TxFast.run`` first:
``harness_tx_burst`` (harness.vfu.txburst, in the cffi extension) walks the avail ring, maps
each chain's buffers as ``DmaLedger._map_sg_fused`` over ``DirectMapOps`` would (the same
pieces, the same region checks), ``writev``s the frame to the backend's fd and writes the used
entry, for as many chains as it can take. The first chain it would not take (anything the
Python path would refuse, drop or treat specially) stays in the ring, and the flush pops it on
the Python path, which judges it in its own order and words; then the burst goes on in C. So
the guest, the wire and the counters see what the Python path alone would make them see; only
the interpreter's work per chain is gone. tests/unit/test_txfast.py holds the two paths to that
on hostile rings.

The DMA ledger still accounts for every mapping: the burst's pieces are counted as maps and
unmaps (``DmaLedger.account_transient``), their peak with the mappings that were live. What
holds for a whole burst is checked here once, before it: Bus Master Enable (the ledger's
check; the server is single-threaded, so it cannot change during a burst), the map-ops stack
(a DmaLedger, checking or not, over exactly ``DirectMapOps``, or ``DirectMapOps`` itself: the
bounce, vIOMMU-domain and fault-injecting layers keep the Python path), rings that need no
syncs, no misbehaviour, a backend with a file descriptor (a plain TAP: a capture must see each
frame), and at most 64 guest regions (behind a vIOMMU every page is a region and changes with
each DMA_MAP: rebuilding the table per burst would cost more than it saves).

Host addresses of the regions and rings are taken without holding a buffer export (so
``GuestMemory`` can still release a removed region's view) and are rebuilt whenever
``GuestMemory.generation`` moved or the queue's rings were remapped.

``HARNESS_FAST_TX=off`` keeps every chain on the Python path (the A/B's other side).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from harness.dma import DirectMapOps, DmaLedger, GuestMemory, MapOps
from harness.vfu.txburst import BUDGET, EMPTY, SLOW
from harness.virtio.chain import Virtqueue
from harness.virtio.constants import NET_HDR_SIZE
from harness.virtio.netdefs import FAST_TX_ENV
from harness.virtio.virtqueue import SplitVirtqueue

log = logging.getLogger(__name__)

#: More regions than this: the Python path (see the module docstring).
MAX_REGIONS = 64

try:
    from harness.vfu._vfu import ffi, lib

    _BUILT = True
except ImportError:  # the extension is not built: everything stays on the Python path
    _BUILT = False

__all__ = ["BUDGET", "EMPTY", "FAST_TX_ENV", "SLOW", "DirectTx", "TxFast", "fast_tx"]


@runtime_checkable
class DirectTx(Protocol):
    """A backend the device may write TX frames to itself: ``writev(2)`` of the vnet header and
    frame on ``tx_fd()``, as its ``writev`` would; ``tx_failed`` is told of refused writes."""

    def tx_fd(self) -> int: ...

    def tx_failed(self, count: int, err: int) -> None: ...


def fast_tx(mapops: MapOps, tx_max: int) -> TxFast | None:
    """The device's TxFast, or None when its map-ops stack (or the build, or the environment)
    keeps TX on the Python path for good."""
    if not _BUILT or os.environ.get(FAST_TX_ENV, "on") == "off":
        return None
    ledger: DmaLedger | None = None
    inner = mapops
    if type(mapops) is DmaLedger:
        ledger = mapops if mapops.checks else None
        inner = mapops.inner
        if getattr(inner, "memory", None) is not mapops.memory:
            return None
    if type(inner) is not DirectMapOps:
        return None
    return TxFast(inner.memory, ledger, mapops, inner.max_mapping_size(), tx_max)


@dataclass
class _Rings:
    """One queue's C state and what its ring addresses were derived from."""

    c: Any  # harness_txq_t *
    rings: list[Any]
    generation: int


def _address(view: memoryview) -> int:
    """The host address of ``view``'s memory, holding no buffer export afterwards."""
    buf = ffi.from_buffer(view)
    try:
        return int(ffi.cast("uintptr_t", buf))
    finally:
        ffi.release(buf)


class TxFast:
    """The C TX burst for one device: the guest-region table and each TX queue's C state."""

    def __init__(
        self, memory: GuestMemory, ledger: DmaLedger | None, mapops: MapOps, max_map: int,
        tx_max: int,
    ) -> None:  # fmt: skip
        self.memory = memory
        self.ledger = ledger  # None: no checks to account for (no ledger, or HARNESS_LEDGER=off)
        self._bus_master = ledger.bus_master if ledger is not None else None
        self._mapops = mapops
        self._max_map = max_map
        self._tx_max = tx_max
        self._generation = -1
        self._table: Any = None
        self._nregions = 0
        self._queues: dict[int, _Rings] = {}
        self._fds: dict[int, tuple[object, int]] = {}
        #: Chains the C burst completed, and bursts run (for stats and tests).
        self.chains = 0
        self.bursts = 0

    def _regions(self) -> bool:
        """The region table for the memory as it is now; False: too many regions for it."""
        memory = self.memory
        if self._generation == memory.generation:
            return self._table is not None
        self._generation = memory.generation
        self._table = None
        self._queues.clear()  # ring addresses are re-derived too: their memory may have gone
        regions = memory.region_objects()
        if len(regions) > MAX_REGIONS:
            return False
        table = ffi.new("harness_region_t[]", max(1, len(regions)))
        for slot, r in zip(table, regions, strict=False):
            slot.iova = r.iova
            slot.last = r.end - 1
            slot.host = ffi.NULL if r.view is None else ffi.cast("uint8_t *", _address(r.view))
        self._table = table
        self._nregions = len(regions)
        return True

    def _state(self, q: SplitVirtqueue) -> Any:
        """``q``'s C state with its ring addresses current, or None (rings not usable now)."""
        st = self._queues.get(id(q))
        if st is not None and st.rings is q._rings and st.generation == self._generation:
            return st.c
        desc, avail, used = q._desc, q._avail16, q._used32
        if desc is None or avail is None or used is None:
            return None
        c = ffi.new("harness_txq_t *")
        try:
            c.desc = ffi.cast("uint8_t *", _address(desc))
            c.avail = ffi.cast("uint16_t *", _address(avail))
            c.used = ffi.cast("uint32_t *", _address(used))
        except ValueError:  # a view released under a revoked mapping: the Python path says so
            return None
        c.size = q.size
        c.regions = self._table
        c.nregions = self._nregions
        c.max_map = self._max_map
        c.hdr_len = NET_HDR_SIZE
        c.tx_max = self._tx_max
        self._queues[id(q)] = _Rings(c, q._rings, self._generation)
        return c

    def _fd(self, backend: object) -> int:
        known = self._fds.get(id(backend))
        if known is not None and known[0] is backend:
            return known[1]
        fd = backend.tx_fd() if isinstance(backend, DirectTx) else -1
        self._fds[id(backend)] = (backend, fd)
        return fd

    def run(self, q: Virtqueue, backend: object, budget: int) -> tuple[int, int] | None:
        """Complete up to ``budget`` chains of ``q`` in C: (chains done, why it stopped:
        EMPTY, BUDGET or SLOW, the next chain being the Python path's), or None when the
        burst cannot run now (the flush then pops every chain on the Python path)."""
        if (type(q) is not SplitVirtqueue or q.misbehave is not None or q.broken
                or not q._rings or q._desc_sync or q._avail_sync or q._used_sync):  # fmt: skip
            return None
        if self._bus_master is not None and not self._bus_master():
            return None  # the ledger refuses the map (transiently) on the Python path
        fd = self._fd(backend)
        if fd < 0 or not self._regions():
            return None
        c = self._state(q)
        if c is None:
            return None
        c.fd = fd
        c.next_avail = q._next_avail
        c.avail_seen = q._avail_seen
        c.used_idx = q._used_idx
        done = lib.harness_tx_burst(c, budget)
        self.bursts += 1
        q._avail_seen = c.avail_seen
        if done:
            q._next_avail = c.next_avail
            q._used_idx = c.used_idx
            st = q.stats
            st.chains += done
            st.packets += done  # a refused write is counted by the backend, as its writev does
            st.bytes += c.bytes
            self.chains += done
            if self.ledger is not None:
                self.ledger.account_transient(c.pieces, c.map_bytes, c.max_pieces)
            if c.write_errors:
                backend.tx_failed(c.write_errors, c.last_errno)  # type: ignore[attr-defined]
        return done, c.stop
