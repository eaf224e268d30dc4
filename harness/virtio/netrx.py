"""NetRxPath: virtio-net's receive side, frames from a backend into the driver's RX rings.

The device (harness.virtio.net.VirtioNetDevice) is a NetRxPath; this class holds the methods
that move frames backend -> RX ring and the decisions around them: whether a pair's backend
should be polled at all (``rx_wanted``), gathering room for a frame from the ring into the
pair's pool of mapped chains (harness.virtio.rxpool), the header checks a frame must pass
before the driver sees it (harness.virtio.rxhdr), num_buffers, and dropping what arrives while
the link is down or the queue is being reset. The state it works on (pools, starvation, the
negotiated frame sizes) is set up by the device's constructor and transport hooks; it is
declared here so each half can be read on its own.
"""

from __future__ import annotations

import logging

from harness.virtio import constants as C
from harness.virtio import netmisbehave, rxhdr
from harness.virtio.chain import Virtqueue
from harness.virtio.ctrl import ControlState
from harness.virtio.fastpath import BUDGET, EMPTY, FastPath
from harness.virtio.misbehave import Misbehave
from harness.virtio.netdefs import IOV_MAX, RX_MAX_GSO, U16
from harness.virtio.pci import VirtioPciDevice
from harness.virtio.protocols import PacketBackend
from harness.virtio.rxpool import RxPool

log = logging.getLogger("harness.virtio.net")


class NetRxPath(VirtioPciDevice):
    """The RX half of VirtioNetDevice (and what both halves share: ``pair_backend``,
    ``_usable``, ``_publish``, the per-event ``_after_event`` hook)."""

    # Set by VirtioNetDevice.__init__ and its transport hooks.
    backend: PacketBackend
    extra_backends: list[PacketBackend]
    max_pairs: int
    control: ControlState
    link_up: bool
    batch: int
    batch_used: bool
    rx_pool_keep: bool
    misbehave: Misbehave | None
    header_drops: int
    csum_completed: int
    filtered: int
    reset_drops: int
    link_drops: int
    oversize_drops: int
    _rx_pools: list[RxPool]
    _rx_filter: bool
    _rx_starved: list[bool]
    _rx_reset: list[bool]
    _rx_max: int
    _rx_frame_max: int
    _mrg: bool
    _scratch: bytearray | None
    fastpath: FastPath | None

    def _after_event(self) -> None:
        """After each TX flush and RX batch: the device's per-event work (misbehaviours)."""

    def dma_unmapped(self, iova: int, size: int) -> None:
        """Also give back pooled RX chains with a buffer in [iova, iova+size): the device
        must hold no mapping of memory that goes away."""
        for pool in self._rx_pools:
            if pool.overlaps(iova, size):
                pool.give_back()
        super().dma_unmapped(iova, size)

    def memory_changed(self) -> None:
        """Also give back every pooled RX chain (the range is unknown)."""
        for pool in self._rx_pools:
            pool.give_back()
        super().memory_changed()

    def _usable(self) -> bool:
        return self.driver_ok and self.bus_master()

    def pair_backend(self, pair: int) -> PacketBackend:
        """The backend queue pair ``pair`` moves frames through."""
        return self.backend if pair == 0 else self.extra_backends[pair - 1]

    def rx_wanted(self, pair: int = 0) -> bool:
        """RX of ``pair`` has (or may have) buffers, or the link is down and its backend is to
        be drained: backend ``pair`` should be polled for readability."""
        if not self._usable() or pair >= self.control.pairs:
            return False
        if not self.link_up:
            return True
        q = self.queues[2 * pair]
        if self._rx_reset[pair] and not q.enabled:
            return True  # being reset: drain the backend, drop (not hold) what it has
        return not self._rx_starved[pair] and q.enabled and not q.broken

    def on_backend_readable(self, pair: int = 0) -> None:
        """Move frames backend -> RX ring until the backend is empty, buffers or batch run out.

        Chains gathered for one frame but not used by it stay mapped in the pair's pool
        (harness.virtio.rxpool) for the next frame, and with HARNESS_RX_POOL=keep for the next
        readable event too: with guest GSO a frame needs room for 64 KiB (dozens of mergeable
        buffers), and re-mapping all of them for every 66-byte ACK would dominate the cost of
        receiving.
        """
        if not self.rx_wanted(pair):
            return
        if not self.link_up:
            self._rx_discard(pair)
            return
        q = self.queues[2 * pair]
        if not q.enabled:  # reset by the driver (rx_wanted): such frames are dropped
            self._rx_discard(pair, link=False)
            return
        st = q.stats
        backend = self.pair_backend(pair)
        pool = self._rx_pools[pair]
        if pool.queue is not None and pool.queue is not q:
            pool.forget(self.mapops)  # a swapped queue object: never the case while running
        elif pool.chains and not q.ready:
            # Its rings were dropped (guest memory under them went away) and cannot be mapped
            # again now: a push would have no used ring to go to. Start from nothing.
            pool.give_back()
        budget = self.batch
        fast = self.fastpath
        if fast is not None and not self._rx_filter and self.misbehave is None \
                and self.batch_used:
            budget = self._rx_fast(fast, q, pool, backend, budget)
        try:
            for _ in range(budget):
                if not self._rx_gather(q, pool):
                    break
                views = pool.views
                try:
                    got = backend.readv(views)
                except OSError as e:
                    log.debug("%s: backend read failed: %s", q.name, e)
                    got = -1
                if got <= 0:
                    break
                if got < C.NET_HDR_SIZE:
                    st.drops += 1  # a runt without a whole vnet header: nothing to deliver
                    continue
                if not self._rx_header_ok(views, got):
                    st.drops += 1  # the chains stay in the pool for the next frame
                    continue
                if self._rx_filter and not self.control.accepts(
                        rxhdr.read_at(views, C.NET_HDR_SIZE, 6)):
                    st.drops += 1  # not for this driver's MAC filter / RX mode
                    self.filtered += 1
                    continue
                used = 0
                left = got
                for c in pool.chains:
                    if left <= 0:
                        break
                    left -= c.write_len
                    used += 1
                # num_buffers into the first chain's header (plain byte writes are fine: the
                # guest cannot look before used.idx is published).
                rxhdr.write_at(views, C.NET_HDR_NUM_BUFFERS_OFFSET, U16.pack(used))
                if self.misbehave is not None:
                    netmisbehave.rx_header(self.misbehave, pool.chains[0], views, used, got)
                left = got
                for i, c in enumerate(pool.take(used)):
                    n = min(left, c.write_len)
                    q.push(c, n, more=i + 1 < used)  # ``more``: the frame goes on (MRG_RXBUF)
                    left -= n
                st.packets += 1
                st.bytes += got - C.NET_HDR_SIZE
                if not self.batch_used:
                    self._publish(q)
        finally:
            # A broken queue's chains are discarded; otherwise they stay held (keep) or go
            # back to the ring (call, the A/B's old side).
            if q.broken or not self.rx_pool_keep:
                pool.give_back()
        if q.flush():
            self._queue_interrupt(q)
        self._after_event()

    def _rx_fast(
        self, fast: FastPath, q: Virtqueue, pool: RxPool, backend: PacketBackend, budget: int
    ) -> int:
        """Frames in C (harness.virtio.fastpath) from an empty pool; the budget the Python
        path has left: none when the backend ran dry or the budget was spent, the rest when
        the burst stopped at a chain to refuse or at too little room (the Python path's)."""
        # The pool's chains go back to the ring first: the burst stages from the ring itself.
        got = fast.rx(q, backend, budget, mrg=self._mrg, room=self._rx_max,
                      frame_max=self._rx_frame_max, negotiated=self.negotiated,
                      first=pool.give_back)  # fmt: skip
        if got is None:
            return budget
        self.header_drops += got.header_drops
        self.oversize_drops += got.oversize_drops
        self.csum_completed += got.csum_completed
        if got.read:
            q.disable_notify()  # it had buffers: refills need no doorbell (as _rx_gather)
        return 0 if got.stop in (EMPTY, BUDGET) else budget - got.frames

    def _publish(self, q: Virtqueue) -> None:
        """Publish what ``q`` used so far and interrupt if the driver wants one (the same
        EVENT_IDX / NO_INTERRUPT decision as at the end of a batch)."""
        if q.flush():
            self._queue_interrupt(q)

    def _rx_header_ok(self, views: list[memoryview], got: int) -> bool:
        """The frame's header made one the driver negotiated (harness.virtio.rxhdr), or
        False: drop it (counted)."""
        verdict = rxhdr.check(views, got, self.negotiated, self._rx_frame_max)
        if verdict is rxhdr.Verdict.OK:
            return True
        if verdict is rxhdr.Verdict.CSUM_DONE:
            self.csum_completed += 1
            return True
        if verdict is rxhdr.Verdict.DROP_OVERSIZE:
            self.oversize_drops += 1
        else:
            self.header_drops += 1
        return False

    def _rx_discard(self, pair: int = 0, link: bool = True) -> None:
        """Link down (``link``) or RX queue being reset: read up to a batch of frames from the
        backend and drop them."""
        if self._scratch is None:
            self._scratch = bytearray(RX_MAX_GSO)
        views = [memoryview(self._scratch)]
        st = self.queues[2 * pair].stats
        for _ in range(self.batch):
            try:
                got = self.pair_backend(pair).readv(views)
            except OSError as e:
                log.debug("rx0: backend read failed: %s", e)
                return
            if got <= 0:
                return
            st.drops += 1
            if link:
                self.link_drops += 1
            else:
                self.reset_drops += 1

    def _rx_gather(self, q: Virtqueue, pool: RxPool) -> bool:
        """Top ``pool`` up to hold one max-size frame (one chain without MRG_RXBUF).

        False when that is not possible now: then ``pool`` is empty again (everything given
        back to the ring) and the device waits for the driver's kick.
        """
        if pool.chains and (not self._mrg or pool.cap >= self._rx_max):
            return True  # held from before: no ring access at all
        map_errors = q.stats.map_errors
        for _attempt in range(4):
            full = False  # as many buffers as one readv takes
            while (self._mrg and pool.cap < self._rx_max) or not pool.chains:
                c = q.pop()
                if c is None:
                    break
                if c.readable or c.write_len < C.NET_HDR_SIZE:
                    what = "device-readable buffers" if c.readable else "room for no vnet header"
                    q.discard(c)
                    pool.give_back()
                    q.fail(f"RX chain with {what}", c.head)
                    return False
                if len(pool.views) + len(c.writable) > IOV_MAX:
                    # readv takes at most IOV_MAX buffers (EINVAL beyond, every time: the frame
                    # would never leave the TAP). Tiny buffers: receive into the room there is.
                    q.unpop(c)
                    full = True
                    break
                pool.add(q, c)
            if q.broken:
                pool.give_back()  # discards: the queue is broken
                return False
            # Enough room, or every buffer the ring can hold is here and it still is not:
            # then use what there is rather than wait for buffers that cannot come.
            if pool.chains and (not self._mrg or pool.cap >= self._rx_max
                                or len(pool) >= q.size or full):
                q.disable_notify()  # we have buffers: refills need no doorbell
                return True
            pool.give_back()
            if q.stats.map_errors != map_errors:
                return False  # transient: stay polling, the next readable event retries
            if not q.enable_notify():
                break
        if not q.broken:
            q.stats.no_buffers += 1
            self._rx_starved[q.index // 2] = True
        return False

