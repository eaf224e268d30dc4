"""VirtioNetDevice: virtio-net (one queue pair, or up to 4 with MQ) moving frames between its
rings and a backend per pair.

Frames travel with their 12-byte virtio_net_hdr_v1 straight to and from the backend (a TAP
opened with IFF_VNET_HDR and TUNSETVNETHDRSZ=12), so checksum/TSO offloads need no work here;
only num_buffers is ours to fill in on RX. Data never gets copied by Python: TX hands the
guest's buffers to ``writev``, RX ``readv``s straight into the guest's buffers.

This module holds the device's constructor, transport hooks, link, announce, the control
queue and TX; the RX half is ``NetRxPath`` (harness.virtio.netrx), ``stats``/``dump_queue`` are
``NetStats``' (harness.virtio.netstats), the constants are in harness.virtio.netdefs
(re-exported here) and what a misbehaviour does is in harness.virtio.netmisbehave.

Link state (VIRTIO_NET_F_STATUS): ``set_link`` flips VIRTIO_NET_S_LINK_UP in the config
``status`` field, bumps config_generation and, once the driver is up (DRIVER_OK), signals the
config change (ISR bit 1, the msix_config vector), as virtio 1.x 4.1.4.3.1 and 4.1.5.3 require.
The link survives device resets (it is the cable, not device state). While it is down the device
behaves like a NIC without carrier: nothing reaches the wire and nothing comes from it. TX chains
are still consumed and completed (a real NIC does not hang its TX ring either; the guest would
see a TX timeout), their frames dropped and counted (tx0 ``drops``, ``link_drops``); frames the
backend holds are read and discarded (rx0 ``drops``, ``link_drops``) rather than left to pile up
and arrive stale when the link comes back.

Multiqueue (VIRTIO_NET_F_MQ, ``max_pairs`` > 1): queues rx0 tx0 rx1 tx1 ... ctrl (5.1.2), pair
i moving frames through backend i (one fd of a multi-queue TAP). Only pairs below the driver's
VQ_PAIRS_SET value (1 until it sends one, and again after a reset) carry traffic (5.1.6.5.5):
``rx_wanted(i)`` is False for the others and ``on_pairs`` tells the owner, which detaches their
TAP queues so the kernel steers nothing there. TX on an inactive pair (a driver breaking the
rule) is still served, through backend 0, rather than left to hang.

Per-queue reset (VIRTIO_F_RING_RESET, the transport's queue_reset): while an RX queue is reset
and not yet enabled again, its backend's frames are read and dropped (``reset_drops``, 5.1.6.5.6.2)
rather than held to arrive stale. ``announce()`` (GUEST_ANNOUNCE) sets VIRTIO_NET_S_ANNOUNCE;
the driver's ANNOUNCE_ACK clears it (harness.virtio.ctrl).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from harness.dma import MapOps
from harness.virtio import constants as C
from harness.virtio import netmisbehave
from harness.virtio.chain import Virtqueue
from harness.virtio.ctrl import ControlState, serve_queue
from harness.virtio.fastpath import EMPTY, SLOW, FastPath, fast_path
from harness.virtio.features import check_bits
from harness.virtio.misbehave import Misbehave, Misbehaviour
from harness.virtio.netdefs import (
    BATCH_USED_ENV,
    CONFIG_LEN,
    CONFIG_LEN_MQ,
    CONFIG_LEN_MTU,
    CTRL_FEATURES,
    CTRL_QUEUE,
    DEFAULT_FEATURES,
    GUEST_GSO,
    MAX_PAIRS,
    MQ_FEATURES,
    OFFLOAD_FEATURES,
    PACKED_FEATURES,
    RESET_ANNOUNCE_FEATURES,
    RX_MAX_GSO,
    RX_MAX_MTU,
    RX_QUEUE,
    SUPPORTED_FEATURES,
    TX_HOLDOFF_MIN,
    TX_MAX,
    TX_QUEUE,
    U16,
    batch_used,
    tx_holdoff,
)
from harness.virtio.netstats import NetStats
from harness.virtio.nettimers import TxTimers
from harness.virtio.protocols import (
    Barrier,
    BurstEngine,
    InterruptSink,
    PacketBackend,
    no_barrier,
)
from harness.virtio.rxpool import RxPool, rx_pool_keep

# The constants live in harness.virtio.netdefs; importers keep using this module.
__all__ = [
    "BATCH_USED_ENV",
    "CTRL_FEATURES",
    "CTRL_QUEUE",
    "DEFAULT_FEATURES",
    "MAX_PAIRS",
    "MQ_FEATURES",
    "OFFLOAD_FEATURES",
    "PACKED_FEATURES",
    "RESET_ANNOUNCE_FEATURES",
    "RX_QUEUE",
    "SUPPORTED_FEATURES",
    "TX_QUEUE",
    "VirtioNetDevice",
    "batch_used",
]

log = logging.getLogger(__name__)




class VirtioNetDevice(NetStats):
    """A virtio-net device with rx0 (queue 0) and tx0 (queue 1).

    The server loop calls ``bar0_read/bar0_write`` from region callbacks, then ``process()``
    (kicks; repeat while ``has_work()``), and ``on_backend_readable()`` when the backend fd is
    readable and ``rx_wanted()`` is True.
    """

    def __init__(
        self,
        mapops: MapOps,
        irq: InterruptSink,
        backend: PacketBackend,
        *,
        mac: bytes,
        queue_size: int = 256,
        features: int | None = None,
        bus_master: Callable[[], bool],
        barrier: Barrier = no_barrier,
        batch: int = 256,
        mtu: int | None = None,
        on_offloads: Callable[[int], None] | None = None,
        max_pairs: int = 1,
        extra_backends: Sequence[PacketBackend] = (),
        on_pairs: Callable[[int], None] | None = None,
        bursts: BurstEngine | None = None,
    ) -> None:
        if len(mac) != 6:
            raise ValueError(f"mac must be 6 bytes, got {len(mac)}")
        feats = DEFAULT_FEATURES if features is None else features
        accepted = SUPPORTED_FEATURES | MQ_FEATURES | RESET_ANNOUNCE_FEATURES | PACKED_FEATURES
        if feats & ~accepted:
            raise ValueError(f"unsupported features {feats & ~accepted:#x}")
        check_bits(feats)
        if (mtu is not None) != bool(feats >> C.NET_F_MTU & 1):
            raise ValueError("an mtu goes with VIRTIO_NET_F_MTU and only with it")
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} out of range 68..65535")
        mq = bool(feats >> C.NET_F_MQ & 1)
        if max_pairs > 1 and not mq:
            raise ValueError("max_pairs > 1 goes with VIRTIO_NET_F_MQ")
        if not 1 <= max_pairs <= MAX_PAIRS or len(extra_backends) != max_pairs - 1:
            raise ValueError(f"max_pairs {max_pairs}: 1..{MAX_PAIRS}, one backend per pair")
        pair_names = [f"{d}{i}" for i in range(max_pairs) for d in ("rx", "tx")]
        super().__init__(
            mapops, irq,
            queue_names=[*pair_names, *(["ctrl"] if feats >> C.NET_F_CTRL_VQ & 1 else [])],
            queue_size=queue_size,
            device_features=feats,
            device_config_len=(CONFIG_LEN_MTU if mtu is not None
                               else CONFIG_LEN_MQ if mq else CONFIG_LEN),
            bus_master=bus_master,
            barrier=barrier,
        )  # fmt: skip
        self.backend = backend
        self.max_pairs = max_pairs
        #: Pairs 1.. (pair 0 is ``backend``, which tests and the capture may replace).
        self.extra_backends: list[PacketBackend] = list(extra_backends)
        #: Told the number of active pairs at VQ_PAIRS_SET and reset (1).
        self.on_pairs = on_pairs
        self._ctrl_index = 2 * max_pairs
        self.mac = bytes(mac)
        self.mtu = mtu
        #: Told the negotiated features at DRIVER_OK and 0 at reset: the backend then hands
        #: us only headers the driver negotiated (the server sets TUNSETOFFLOAD from them).
        self.on_offloads = on_offloads
        #: RX frames whose vnet header the driver could not take (a gso_type it did not
        #: negotiate, a partial checksum that cannot be finished): dropped, never delivered.
        self.header_drops = 0
        self.driver_ok_features = 0
        #: RX partial checksums finished here for a driver without GUEST_CSUM.
        self.csum_completed = 0
        self.link_up = True
        self.batch = batch
        #: False (HARNESS_BATCH_USED=0): publish after every frame (measurement only).
        self.batch_used = batch_used()
        #: The TX hold-off (HARNESS_TX_HOLDOFF_US, off by default): harness.virtio.nettimers.
        self.timers = TxTimers(max_pairs, tx_holdoff())
        #: The C bursts (harness.virtio.fastpath), None where the map ops keep both in Python.
        self.fastpath: FastPath | None = fast_path(mapops, bursts)
        #: False (HARNESS_RX_POOL=call): unused RX chains go back to the ring after every
        #: readable event instead of staying mapped in ``_rx_pools`` (measurement only).
        self.rx_pool_keep = rx_pool_keep()
        #: Per pair: RX chains popped and mapped for the next frames (harness.virtio.rxpool).
        self._rx_pools = [RxPool() for _ in range(max_pairs)]
        #: The control queue's state (RX modes, MAC filter); a fresh one at every reset.
        self.control = ControlState(self.mac, max_pairs=max_pairs)
        self._rx_filter = False  # CTRL_RX negotiated: frames pass control.accepts()
        self.filtered = 0  # RX frames the driver's RX mode / MAC filter turned away
        self._rx_starved = [False] * max_pairs  # per pair: waiting for the driver's RX kick
        #: Per pair: its RX queue was reset by the driver (queue_reset) and is not enabled
        #: again yet; meanwhile its backend is drained and the frames dropped (5.1.6.5.6.2).
        self._rx_reset = [False] * max_pairs
        self.reset_drops = 0  # RX frames dropped because their queue was being reset
        self._rx_max = RX_MAX_MTU
        self._rx_frame_max = 1518
        self._mrg = False
        self.link_changes = 0
        self.link_drops = 0  # frames dropped, either direction, because the link was down
        self.oversize_drops = 0  # TX frames longer than any Ethernet frame can be
        self._scratch: bytearray | None = None  # where link-down RX frames are read to die
        #: Active misbehaviours (harness.virtio.misbehave), None when the device behaves.
        self.misbehave: Misbehave | None = None

    @property
    def rx(self) -> Virtqueue:
        """Queue rx0 (looked up each time: the transport swaps the queue objects when the
        driver negotiates the packed ring format)."""
        return self.queues[RX_QUEUE]

    @property
    def tx(self) -> Virtqueue:
        """Queue tx0 (looked up each time, like ``rx``)."""
        return self.queues[TX_QUEUE]

    # ---- misbehaviours -----------------------------------------------------------------------

    def add_misbehaviour(self, spec: Misbehaviour) -> None:
        """Switch one misbehaviour on (the device and both queues consult it from now on)."""
        if self.misbehave is None:
            self.misbehave = Misbehave()
            for q in self.queues:
                q.misbehave = self.misbehave
        self.misbehave.add(spec)
        log.warning("misbehaviour on: %s", spec)

    def _after_event(self) -> None:
        if self.misbehave is not None:
            netmisbehave.device_event(self, self.misbehave)

    # ---- transport hooks ---------------------------------------------------------------------

    def _device_config(self) -> bytes:
        status = C.NET_S_LINK_UP if self.link_up else 0
        if self.control.announce_pending:
            status |= C.NET_S_ANNOUNCE
        # MAC_ADDR_SET updates the config space mac before the command is consumed (5.1.6.5.2.1).
        mac = self.control.mac if self.has_feature(C.NET_F_CTRL_MAC_ADDR) else self.mac
        config = mac + U16.pack(status)
        if self.mtu is not None or self.device_features >> C.NET_F_MQ & 1:
            config += U16.pack(self.max_pairs)  # max_virtqueue_pairs
        if self.mtu is not None:
            config += U16.pack(self.mtu)
        return config

    def _on_driver_ok(self) -> None:
        self._mrg = self.has_feature(C.NET_F_MRG_RXBUF)
        # Without MTU negotiated the driver sized its buffers for 1500 (5.1.6.3.1).
        mtu = self.mtu if self.mtu is not None and self.has_feature(C.NET_F_MTU) else 1500
        self._rx_frame_max = mtu + 18  # Ethernet header + VLAN tag
        self._rx_max = (RX_MAX_GSO if self.negotiated & GUEST_GSO
                        else C.NET_HDR_SIZE + self._rx_frame_max)
        self._rx_starved = [False] * self.max_pairs
        self._rx_reset = [False] * self.max_pairs
        #: The features of the last DRIVER_OK (kept across resets: what the guest ran with).
        self.driver_ok_features = self.negotiated
        log.info("DRIVER_OK: features %#x", self.negotiated)
        self._rx_filter = self.has_feature(C.NET_F_CTRL_RX)
        if self.on_offloads is not None:
            self.on_offloads(self.negotiated)

    def _on_reset(self) -> None:
        # The queues forgot their popped chains: unmap the pooled ones before the server's
        # after_reset leak check looks at the ledger.
        for pool in self._rx_pools:
            pool.forget(self.mapops)
        self._rx_starved = [False] * self.max_pairs
        self._rx_reset = [False] * self.max_pairs
        self.timers.clear_all()
        pairs = self.control.pairs
        self.control.reset()
        if pairs != 1 and self.on_pairs is not None:
            self.on_pairs(1)
        self._rx_filter = False
        if self.on_offloads is not None:
            self.on_offloads(0)

    def _on_queue_reset(self, q: Virtqueue) -> None:
        # An RX queue reset forgets its starvation: the re-enabled ring's first kick (or the
        # next readable event) starts it again. A TX queue has nothing of its own to forget:
        # every chain it took was completed inside process(), before this write could arrive;
        # only its hold-off timer, which must not outlive the ring.
        if q.index < self._ctrl_index and q.index % 2 == 1:
            self.timers.clear(q.index // 2)
        if q.index < self._ctrl_index and q.index % 2 == 0:
            self._rx_pools[q.index // 2].forget(self.mapops)
            self._rx_starved[q.index // 2] = False
            self._rx_reset[q.index // 2] = True

    def announce(self) -> int:
        """Ask the driver to announce itself (VIRTIO_NET_S_ANNOUNCE, 5.1.6.5.4).

        Sets the status bit and raises the config interrupt; the driver sends its gratuitous
        packets and acks with VIRTIO_NET_CTRL_ANNOUNCE_ACK, which clears the bit. ValueError
        (one line) when the driver has not negotiated GUEST_ANNOUNCE or is not running;
        otherwise the number of announcements requested so far.
        """
        if not self.device_features >> C.NET_F_GUEST_ANNOUNCE & 1:
            raise ValueError("the device does not offer VIRTIO_NET_F_GUEST_ANNOUNCE "
                             "(--features guest_announce=on, with ctrl_vq=on)")
        if not self.driver_ok or not self.has_feature(C.NET_F_GUEST_ANNOUNCE):
            raise ValueError("the driver has not negotiated VIRTIO_NET_F_GUEST_ANNOUNCE "
                             "(or is not running)")
        if not self.has_feature(C.NET_F_STATUS):
            raise ValueError("the driver has not negotiated VIRTIO_NET_F_STATUS: it cannot see "
                             "the announce bit")
        self.control.announce_pending = True
        self.control.announces += 1
        log.info("announce requested")
        self.config_changed()
        return self.control.announces

    def set_link(self, up: bool) -> bool:
        """Set the link state; True when it changed.

        A change bumps config_generation (when the device offers STATUS: only then does the
        field exist) and raises one config interrupt once the driver has set DRIVER_OK (before
        that the driver reads the field itself, like QEMU's virtio_notify_config). No change,
        no interrupt.
        """
        if up == self.link_up:
            return False
        self.link_up = up
        self.link_changes += 1
        log.info("link %s", "up" if up else "down")
        if self.device_features >> C.NET_F_STATUS & 1:
            if self.status & C.STATUS_DRIVER_OK:
                self.config_changed()
            else:
                self.config_generation = (self.config_generation + 1) & 0xFF
        return True

    # ---- server loop API ---------------------------------------------------------------------

    def has_work(self) -> bool:
        """Kicks are waiting for process() (and the device may act on them now)."""
        return bool(self._pending) and self._usable()

    def next_timer(self) -> float | None:
        """When (time.monotonic) process() wants to run again without a kick: the earliest
        TX hold-off, or the end of a misbehaviour's wrong used.idx; None when neither."""
        due = self.timers.next()
        if self.misbehave is not None:
            held = self.misbehave.publish_due()
            if held is not None and (due is None or held < due):
                due = held
        return due

    def process(self) -> None:
        """Handle pending kicks: TX chains to the backend, RX kicks end starvation."""
        if self.timers.holdoff:
            for pair in self.timers.due_holds():  # a held-off ring's time is up: as a kick
                self._pending |= 2 << 2 * pair
        if self.status & C.STATUS_NEEDS_RESET:
            self._pending = 0
            return
        if not self._usable():
            return  # keep the kicks: they are served once the guest allows DMA again
        if self.misbehave is not None:
            netmisbehave.publish_released(self, self.misbehave)
        pending = self._pending
        self._pending = 0
        for pair in range(self.max_pairs):
            if pending & (1 << 2 * pair):
                self._rx_starved[pair] = False
            if pending & (2 << 2 * pair):
                self._tx_flush(pair)
        ctrl = self._ctrl_index
        if pending & (1 << ctrl) and self.num_queues > ctrl:
            q = self.queues[ctrl]
            pairs, mac = self.control.pairs, self.control.mac
            if serve_queue(q, self.control, self.negotiated):
                self._queue_interrupt(q)
            if self.control.mac != mac:  # the config mac changed: the next read must see
                self.config_generation = (self.config_generation + 1) & 0xFF  # a new generation
            if self.control.pairs != pairs:
                log.info("queue pairs: %d -> %d", pairs, self.control.pairs)
                for pool in self._rx_pools[self.control.pairs:]:
                    pool.give_back()  # an inactive pair's buffers: available, not held
                if self.on_pairs is not None:
                    self.on_pairs(self.control.pairs)

    # ---- TX ----------------------------------------------------------------------------------

    def _tx_flush(self, pair: int = 0) -> None:
        if self.misbehave is not None and netmisbehave.tx_stalled(self.misbehave):
            return
        q = self.queues[2 * pair + 1]
        st = q.stats
        # An inactive pair's TAP queue is detached: its frames go out through pair 0's.
        backend = self.pair_backend(pair if pair < self.control.pairs else 0)
        done = 0
        map_errors = st.map_errors
        # The C burst takes the chains it can (harness.virtio.fastpath); the one it stops at is
        # popped below. Not while the link is down, used entries are published one by one
        # (HARNESS_BATCH_USED=0) or a misbehaviour is armed: the Python path has those.
        fast = self.fastpath if self.link_up and self.batch_used and self.misbehave is None \
            else None
        q.disable_notify()
        while True:
            while done < self.batch:
                if fast is not None:
                    got = fast.tx(q, backend, self.batch - done)
                    if got is None:
                        fast = None  # not now (see FastPath.tx): this flush stays in Python
                    else:
                        done += got[0]
                        if got[1] == EMPTY:
                            break
                        if got[1] != SLOW:
                            continue  # the budget is spent: the loop's condition ends it
                chain = q.pop()
                if chain is None:
                    break
                done += 1
                if chain.writable or chain.read_len < C.NET_HDR_SIZE:
                    what = "device-writable buffers" if chain.writable else "no full vnet header"
                    q.discard(chain)
                    q.fail(f"TX chain with {what}", chain.head)
                    break
                if not self.link_up:
                    st.drops += 1  # no carrier: the frame never reaches the wire
                    self.link_drops += 1
                    q.push(chain, 0)
                    continue
                if chain.read_len > TX_MAX:
                    st.drops += 1
                    self.oversize_drops += 1
                    q.push(chain, 0)
                    continue
                try:
                    backend.writev([h.view for h in chain.readable])
                except OSError as e:
                    st.drops += 1
                    log.debug("%s: backend write failed: %s", q.name, e)
                else:
                    st.packets += 1
                    st.bytes += chain.read_len - C.NET_HDR_SIZE
                q.push(chain, 0)
                if not self.batch_used:
                    self._publish(q)
            if q.broken or not q.ready:
                break
            if done >= self.batch:
                self._pending |= 1 << q.index  # fairness: the loop comes back via has_work()
                break
            if self.timers.holdoff and done >= TX_HOLDOFF_MIN:
                # A stream: the driver is adding buffers as fast as we take them. Leave its
                # kicks suppressed and come back after the hold-off (next_timer) instead.
                self.timers.start_hold(pair)
                break
            if not q.enable_notify():
                break
            q.disable_notify()
        if st.map_errors != map_errors:
            self._pending |= 1 << q.index  # a transient map failure: retry, do not wait
        if q.flush():
            self._queue_interrupt(q)
        self._after_event()
