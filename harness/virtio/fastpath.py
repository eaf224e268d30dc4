"""FastPath: the split ring's TX and RX loops in C, for what every check passes (issue 12).

The bursts are C (harness.vfu.burst), reached through a ``BurstEngine`` the device process
gives the device (harness.vfu.bursts.CBursts: harness.vfu stays the only place that touches
cffi); without one, or with ``fast_path`` refusing the map-ops stack, everything is Python.

The device's TX flush (``VirtioNetDevice._tx_flush``) hands each burst to ``FastPath.tx``
first: ``harness_tx_burst`` walks the avail ring,
maps each chain's buffers as ``DmaLedger._map_sg_fused`` over ``DirectMapOps`` would (the same
pieces, the same region checks), ``writev``s the frame to the backend's fd and writes the used
entry, for as many chains as it can take. The first chain it would not take (anything the
Python path would refuse, drop or treat specially) stays in the ring, and the flush pops it on
the Python path, which judges it in its own order and words; then the burst goes on in C.

The RX side (``NetRxPath.on_backend_readable``) hands each readable event to ``FastPath.rx``
first, with the pair's pool of held chains given back to the ring: ``harness_rx_burst`` stages
chains from the ring for room, ``readv``s frames into them, judges each header as
harness.virtio.rxhdr does, writes num_buffers and completes the chains each frame filled.
Whatever it stops at (a chain to refuse, too little room, a filtered device) is the Python
path's, from the same ring. tests/unit/test_fastpath_tx.py and test_fastpath_rx.py hold the
two paths to the same result on hostile rings and frames: what the guest, the wire and the
counters see is what the Python path alone would make them see; the interpreter's work per
frame is what is gone.

The DMA ledger still accounts for every mapping: a burst's pieces are counted as maps and
unmaps (``DmaLedger.account_transient``), their peak with the mappings that were live. What
holds for a whole burst is checked here once, before it: Bus Master Enable (the ledger's
check; the server is single-threaded, so it cannot change during a burst), the map-ops stack
(a DmaLedger, checking or not, over exactly ``DirectMapOps``, or ``DirectMapOps`` itself, with
or without a vIOMMU: the bounce and fault-injecting layers keep the Python path), rings that need no
syncs, no misbehaviour, and a backend with a file descriptor (a plain TAP: a capture must see
each frame).

The C table of guest regions (host address, bounds, writable) is kept in step with
``GuestMemory`` one region at a time: the memory tells the FastPath of every add and removal
(``GuestMemory.watch``), and a removal leaves the table before the region's view is released.
Behind a vIOMMU every guest DMA mapping is a region of its own and comes and goes with each
DMA_MAP/UNMAP, so the table is never rebuilt, only changed: a binary search and a ``memmove``
per region. Host addresses of the regions and rings are taken without holding a buffer export
(so ``GuestMemory`` can still release a removed region's view); a queue's ring addresses are
taken again when its rings were remapped or a region under them was removed.

``HARNESS_FAST_TX=off`` / ``HARNESS_FAST_RX=off`` keep every TX chain / RX frame on the Python
path (the A/B's other side).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from harness import knobs
from harness.dma import DirectMapOps, DmaLedger, GuestMemory, GuestRegion, MapOps
from harness.vfu.burst import BUDGET, EMPTY, NOBUFS, OFFER_CSUM, OFFER_TSO4, OFFER_TSO6, SLOW
from harness.virtio import constants as C
from harness.virtio.chain import Virtqueue
from harness.virtio.netdefs import FAST_RX_ENV, FAST_TX_ENV, RX_PUBLISH_ENV, TX_MAX
from harness.virtio.protocols import BurstEngine
from harness.virtio.virtqueue import SplitVirtqueue

log = logging.getLogger(__name__)

__all__ = ["BUDGET", "EMPTY", "NOBUFS", "SLOW", "DirectIo", "FastPath", "RxResult", "fast_path"]


@runtime_checkable
class DirectIo(Protocol):
    """A backend the device may move frames through itself: ``writev(2)`` / ``readv(2)`` of the
    vnet header and frame on ``io_fd()``, as its ``writev`` / ``readv`` would; ``tx_failed`` is
    told of refused writes, ``rx_failed`` of a failed read (not EAGAIN)."""

    def io_fd(self) -> int: ...

    def tx_failed(self, count: int, err: int) -> None: ...

    def rx_failed(self, err: int) -> None: ...


def fast_directions() -> tuple[bool, bool]:
    """(TX, RX): whether HARNESS_FAST_TX / HARNESS_FAST_RX leave each direction's bursts on
    (``on``, the default) or keep it on the Python path (``off``). A mistyped value fails
    loudly (harness.knobs): an A/B must not measure the default twice."""
    return (knobs.choice(FAST_TX_ENV, ("on", "off"), "on") == "on",
            knobs.choice(FAST_RX_ENV, ("on", "off"), "on") == "on")


def rx_publish_each() -> bool:
    """True for HARNESS_RX_PUBLISH=frame (the C RX burst publishes used.idx after every
    frame), False for batch (the default); ValueError for anything else."""
    return knobs.choice(RX_PUBLISH_ENV, ("batch", "frame"), "batch") == "frame"


def fast_path(mapops: MapOps, engine: BurstEngine | None) -> FastPath | None:
    """The device's FastPath over ``engine``, or None when there is none, or the map-ops stack
    or the environment keeps both directions on the Python path for good."""
    tx, rx = fast_directions()
    if engine is None or not (tx or rx):
        return None
    ledger: DmaLedger | None = None
    inner = mapops
    if type(mapops) is DmaLedger:
        ledger = mapops if mapops.checks else None
        inner = mapops.inner
        if getattr(inner, "memory", None) is not mapops.memory:
            return None
    if type(inner) is not DirectMapOps or inner.max_mapping_size() < 1:
        return None
    return FastPath(engine, inner.memory, ledger, inner.max_mapping_size(), tx=tx, rx=rx)


class RxResult(NamedTuple):
    """What one RX burst did (the queue's counters are already updated)."""

    frames: int
    stop: int  # EMPTY, BUDGET, SLOW or NOBUFS
    header_drops: int
    oversize_drops: int
    csum_completed: int
    read: bool  # it had room and read the backend (at least once)


@dataclass
class _Rings:
    """One queue's C state and the ring mappings its addresses were derived from, and what
    the state was last given: a burst writes only the fields that changed (a cffi field
    write costs several times the Python comparison, and most bursts change none)."""

    c: Any  # harness_vq_t *
    rings: list[Any]
    table: int = -1  # FastPath._table_version the rows were handed over at
    fd: int = -2
    rx_key: tuple[int, int, int, int] | None = None  # (mrg, room, frame_max, negotiated)


class FastPath:
    """The C bursts for one device: the guest-region table and each queue's C state."""

    def __init__(
        self, engine: BurstEngine, memory: GuestMemory, ledger: DmaLedger | None, max_map: int,
        *, tx: bool = True, rx: bool = True,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.ledger = ledger  # None: no checks to account for (no ledger, or HARNESS_LEDGER=off)
        self.tx_on = tx
        self.rx_on = rx
        self.publish_each = int(rx_publish_each())
        self._bus_master = ledger.bus_master if ledger is not None else None
        self._max_map = max_map
        self._queues: dict[Virtqueue, _Rings] = {}
        self._fds: dict[object, int] = {}  # backend -> its io_fd, or -1
        #: TX chains and RX frames the C bursts completed (for stats and tests).
        self.tx_chains = 0
        self.rx_frames = 0
        self._table = engine.region_table()
        #: Bumped by every insert or removal: the rows may have moved, their count changed.
        self._table_version = 0
        for region in memory.region_objects():
            self.region_added(region)
        memory.watch(self)

    # ---- what a burst runs on ----------------------------------------------------------------

    def region_added(self, region: GuestRegion) -> None:
        """GuestMemory's watcher: the region goes into the C table. Never raises (it runs
        inside the DMA_MAP callback): if the row cannot be made, the bursts stop for good and
        the Python path carries everything (a missing row alone would only send chains there,
        but a table that failed once is not one to trust, nor worth another row or log line
        per DMA_MAP)."""
        if not (self.tx_on or self.rx_on):  # off for good (both off by knobs: no FastPath)
            return
        self._table_version += 1
        try:
            host = 0 if region.view is None else self.engine.address(region.view)
            self._table.insert(region.iova, region.end - 1, host, region.writable)
        except Exception as e:  # MemoryError, a released view: anything
            log.error("C bursts off: region %#x+%#x not in their table: %s", region.iova,
                      region.size, e)
            self.tx_on = self.rx_on = False

    def region_removed(self, region: GuestRegion) -> None:
        """GuestMemory's watcher, before the region's memory can go: out of the C table, and
        so are the ring addresses of every queue with a ring in it."""
        self._table.remove(region.iova)
        self._table_version += 1
        for q in [q for q in self._queues if q.overlaps(region.iova, region.size)]:
            del self._queues[q]

    def _state(self, q: SplitVirtqueue) -> _Rings | None:
        """``q``'s C state with its ring addresses current, or None (rings not usable now)."""
        st = self._queues.get(q)
        if st is not None and st.rings is q._rings:
            return st
        desc, avail, used = q._desc, q._avail16, q._used32
        if desc is None or avail is None or used is None:
            return None
        address = self.engine.address
        try:
            c = self.engine.queue(address(desc), address(avail), address(used))
        except ValueError:  # a view released under a revoked mapping: the Python path says so
            return None
        c.size = q.size
        c.max_map = self._max_map
        c.hdr_len = C.NET_HDR_SIZE
        c.tx_max = TX_MAX
        st = self._queues[q] = _Rings(c, q._rings)
        return st

    def _fd(self, backend: object) -> int:
        fd = self._fds.get(backend)
        if fd is None:
            fd = self._fds[backend] = backend.io_fd() if isinstance(backend, DirectIo) else -1
        return fd

    def _ready(self, q: Virtqueue, backend: object) -> _Rings | None:
        """``q``'s C state when a burst may run now (``_load`` then loads its indices); else
        None."""
        if (type(q) is not SplitVirtqueue or q.misbehave is not None or q.broken
                or not q._rings or q._desc_sync or q._avail_sync or q._used_sync):  # fmt: skip
            return None
        if self._bus_master is not None and not self._bus_master():
            return None  # the ledger refuses the map (transiently) on the Python path
        fd = self._fd(backend)
        if fd < 0:
            return None
        st = self._state(q)
        if st is None:
            return None
        if st.fd != fd:
            st.c.fd = st.fd = fd
        if st.table != self._table_version:  # an insert may have moved the rows
            table = self._table
            st.c.regions = table.c
            st.c.nregions = len(table)
            st.table = self._table_version
        return st

    @staticmethod
    def _load(q: SplitVirtqueue, c: Any) -> None:
        c.indirect = int(q.indirect)
        c.next_avail = q._next_avail
        c.avail_seen = q._avail_seen
        c.used_idx = q._used_idx

    def _finish(self, q: SplitVirtqueue, c: Any) -> None:
        """Take the burst's indices and counters back into ``q`` and the ledger."""
        q._avail_seen = c.avail_seen
        q._next_avail = c.next_avail
        q._used_idx = c.used_idx
        st = q.stats
        st.chains += c.chains
        st.packets += c.packets
        st.bytes += c.bytes
        st.drops += c.drops
        if self.ledger is not None and c.pieces:
            self.ledger.account_transient(c.pieces, c.map_bytes, c.max_pieces)

    # ---- the bursts --------------------------------------------------------------------------

    def tx(self, q: Virtqueue, backend: object, budget: int) -> tuple[int, int] | None:
        """Complete up to ``budget`` chains of ``q`` in C: (chains done, why it stopped:
        EMPTY, BUDGET or SLOW, the next chain being the Python path's), or None when the
        burst cannot run now (the flush then pops every chain on the Python path)."""
        st = self._ready(q, backend) if self.tx_on else None
        if st is None:
            return None
        c = st.c
        assert isinstance(q, SplitVirtqueue)
        self._load(q, c)
        done = self.engine.tx(c, budget)
        self._finish(q, c)
        self.tx_chains += done
        if c.write_errors:
            backend.tx_failed(c.write_errors, c.last_errno)  # type: ignore[attr-defined]
        return done, c.stop

    def rx(
        self, q: Virtqueue, backend: object, budget: int, *, mrg: bool, room: int,
        frame_max: int, negotiated: int, first: Callable[[], object],
    ) -> RxResult | None:  # fmt: skip
        """Receive up to ``budget`` frames into ``q`` in C (``room``: what to stage before a
        read, ``frame_max``: the longest frame without GSO, ``negotiated``: the driver's
        features; ``first`` runs once the burst is sure to: the pool's give-back), or None
        when the burst cannot run now."""
        st = self._ready(q, backend) if self.rx_on else None
        if st is None:
            return None
        c = st.c
        assert isinstance(q, SplitVirtqueue)
        first()
        self._load(q, c)
        key = (int(mrg), room, frame_max, negotiated)
        if st.rx_key != key:  # set on the first burst and after a renegotiation only
            c.mrg = int(mrg)
            c.publish_each = self.publish_each
            c.rx_room = room
            c.frame_max = frame_max
            c.offers = ((OFFER_CSUM if negotiated >> C.NET_F_GUEST_CSUM & 1 else 0)
                        | (OFFER_TSO4 if negotiated >> C.NET_F_GUEST_TSO4 & 1 else 0)
                        | (OFFER_TSO6 if negotiated >> C.NET_F_GUEST_TSO6 & 1 else 0))  # fmt: skip
            st.rx_key = key
        done = self.engine.rx(c, budget)
        self._finish(q, c)
        self.rx_frames += done
        if c.last_errno:
            backend.rx_failed(c.last_errno)  # type: ignore[attr-defined]
        read = done > 0 or c.drops > 0 or c.stop in (EMPTY, BUDGET)
        return RxResult(done, c.stop, c.header_drops, c.oversize_drops, c.csum_completed, read)
