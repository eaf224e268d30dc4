"""Device assembly: builds one virtio-net PCI device over vfio-user and a TAP, with its DMA glue.

``DeviceServer`` owns the TAP, the guest memory (libvfio-user's DMA regions), the map-ops stack
with its ledger, the vfio-user context with the device's PCI identity, and the device itself; it
turns libvfio-user's DMA map/unmap/reset callbacks into calls on those, and reports counters
(``stats()`` while running, ``final_stats()`` at exit). It does not run anything: the event loop
(``harness.server.loop``) drives it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.dma import FaultSpec, GuestMemory, build_mapops
from harness.dma.observer import GuestIovaObserver
from harness.net import tap as tap_mod
from harness.net.pcap import CapturingBackend, PcapngWriter
from harness.net.tap import Tap, configure, link_stats, offload_for
from harness.server.loop import ClientCounters
from harness.vfu import DmaRegion, ResetType, VfuContext, memory_barrier
from harness.vfu.bursts import CBursts
from harness.virtio import features as features_mod
from harness.virtio.constants import F_ACCESS_PLATFORM, CapType
from harness.virtio.misbehave import parse_list
from harness.virtio.net import VirtioNetDevice
from harness.virtio.protocols import PacketBackend

log = logging.getLogger(__name__)

PCI_COMMAND = 0x04
PCI_COMMAND_MASTER = 0x04
#: virtio-net: vendor 0x1AF4, modern device id 0x1041, network controller class.
VIRTIO_VENDOR = 0x1AF4
VIRTIO_NET_DEVICE_ID = 0x1041
VIRTIO_SUBSYS_NET = 0x0001


@dataclass(frozen=True)
class ServerConfig:
    socket: Path
    tap: str = "htap0"
    netns: str | None = None
    host_address: str = "198.18.0.1"
    prefixlen: int = 24
    mac: bytes = bytes.fromhex("525400123456")
    queue_size: int = 256
    map_ops: str = "direct"
    control: Path | None = None
    stats: Path | None = None
    faults: str | None = None
    #: Offer VIRTIO_F_ACCESS_PLATFORM: the guest then maps every buffer through its DMA API,
    #: so behind a vIOMMU the device sees IOVAs and one DMA_MAP per guest mapping.
    access_platform: bool = False
    #: Turn all checksum/TSO offload features on (the older spelling; they are on by default
    #: now, see ``features``).
    offloads: bool = False
    #: Feature switches over the defaults (harness.virtio.features), e.g. "csum=off,mtu=9000".
    features: str = ""
    #: Write every frame between guest and TAP to this pcapng file (harness.net.pcap).
    pcap: Path | None = None
    #: Keep serving vfio-user clients after one leaves (otherwise the first one's departure
    #: ends the process). Clients that fail to attach never end it.
    serve_forever: bool = False
    #: Seconds a vfio-user client may take to finish a message or read a reply.
    client_timeout: float = 5.0
    #: Misbehaviour specs (harness.virtio.misbehave), comma lists, each already validated.
    misbehave: tuple[str, ...] = ()


class Irq:
    """InterruptSink over vfu_irq_trigger, counting vectors QEMU has not wired up yet."""

    def __init__(self, ctx: VfuContext) -> None:
        self.ctx = ctx
        self.sent = 0
        self.unwired = 0

    def trigger(self, vector: int) -> None:
        if self.ctx.irq_trigger(vector):
            self.sent += 1
        else:
            self.unwired += 1


class DeviceServer:
    """Owns the vfio-user context, guest memory, map ops, the device and the TAP."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        # Parsed here too: a multi-queue TAP is made so from the start.
        mq = features_mod.resolve(cfg.features, True if cfg.offloads else None).mq
        if mq is not None and cfg.pcap is not None:
            raise ValueError(f"mq={mq} with a pcap capture is not supported (one queue only)")
        tap_mod.create(cfg.tap, multi_queue=mq is not None)
        try:
            self._build(cfg)
        except BaseException:
            self._close_half_built()
            raise

    def _close_half_built(self) -> None:
        """Undo what a failed ``_build`` made: the vfio-user context (its socket file would
        otherwise stay behind for the next start to trip over), the capture, the TAP fds, and
        the TAP itself, which would outlive this process."""
        for name in ("ctx", "capture", "tap"):
            part = self.__dict__.get(name)
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        for t in self.__dict__.get("extra_taps", []):
            with contextlib.suppress(Exception):
                t.close()
        with contextlib.suppress(Exception):
            tap_mod.destroy(self.cfg.tap)

    def _build(self, cfg: ServerConfig) -> None:
        feats = features_mod.resolve(cfg.features, True if cfg.offloads else None)
        # What the kernel may hand us unsegmented and without checksums: nothing until the
        # driver has negotiated what it can take (the device sets it at DRIVER_OK).
        mq = feats.mq is not None
        self.tap = Tap(cfg.tap, offload=0, multi_queue=mq)
        #: With mq=N: the TAP's queues for pairs 1..N-1, detached until the driver enables
        #: their pairs (VQ_PAIRS_SET), so the kernel steers frames only to pairs in use.
        self.extra_taps: list[Tap] = []
        try:
            for _ in range(feats.pairs - 1):
                self.extra_taps.append(Tap(cfg.tap, offload=0, multi_queue=True))
                self.extra_taps[-1].set_queue(False)
        except OSError:
            for t in self.extra_taps:
                t.close()
            self.tap.close()
            raise
        self.extra_backends: list[PacketBackend] = list(self.extra_taps)
        configure(cfg.tap, cfg.host_address, cfg.prefixlen, mtu=feats.mtu)
        # The device and the loop move frames through ``backend``: the TAP itself, or a capture
        # around it. ``tap`` stays the bare TAP (its counters, close, and the drain at exit,
        # whose frames never reach the guest and so are not captured).
        self.capture: CapturingBackend[Tap] | None = None
        self.backend: PacketBackend = self.tap
        if cfg.pcap is not None:
            self.capture = CapturingBackend(self.tap, PcapngWriter.open(cfg.pcap))
            self.backend = self.capture
        self.memory = GuestMemory()
        self.ctx = VfuContext(str(cfg.socket), client_timeout=cfg.client_timeout)
        self.irq = Irq(self.ctx)
        faults = FaultSpec.parse(cfg.faults) if cfg.faults else None
        self.mapops, ledger = build_mapops(cfg.map_ops, self.memory,
                                           bus_master=self._bus_master, faults=faults)
        assert ledger is not None
        self.ledger = ledger
        # libvfio-user's view of the regions (iova -> size), to check the domain against.
        self.vfu_regions: dict[int, int] = {}
        features = feats.bits
        if cfg.access_platform:
            features |= 1 << F_ACCESS_PLATFORM
        self.device = VirtioNetDevice(
            self.mapops, self.irq, self.backend, mac=cfg.mac, queue_size=cfg.queue_size,
            features=features, bus_master=self._bus_master, barrier=memory_barrier,
            bursts=CBursts(),
            mtu=feats.mtu, on_offloads=self._set_offloads, max_pairs=feats.pairs,
            extra_backends=self.extra_backends, on_pairs=self._set_pairs)
        for text in cfg.misbehave:
            for spec in parse_list(text):
                self.device.add_misbehaviour(spec)
        self.dma_maps = 0
        # Every DMA_MAP/UNMAP is a guest IOMMU mapping behind a vIOMMU (virtio: 64-bit mask).
        self.guest_iova = GuestIovaObserver(dma_mask_bits=64)
        self.dma_unmaps = 0
        self.resets: dict[str, int] = {}
        #: Filled by the loop (DeviceLoop(clients=...)); reported under "vfio_user".
        self.clients = ClientCounters()
        # The IOVA space as the device saw it at its busiest (most regions), sampled.
        self.busiest: dict[str, Any] = {}
        self.connected_at: float | None = None
        self._setup_pci()

    # -- set-up --------------------------------------------------------------------------

    def _setup_pci(self) -> None:
        ctx, dev = self.ctx, self.device
        ctx.set_ids(VIRTIO_VENDOR, VIRTIO_NET_DEVICE_ID, VIRTIO_VENDOR, VIRTIO_SUBSYS_NET)
        ctx.set_class(0x02, 0x00, 0x00)
        ctx.set_revision(1)
        ctx.setup_region(0, dev.bar0_size, dev.bar0_read, dev.bar0_write)
        ctx.setup_msix(dev.msix_vectors, table_bar=1, pba_bar=1)
        for cap in dev.caps:
            if cap[3] == CapType.PCI_CFG:  # the driver writes it: the device keeps its bytes
                ctx.add_capability(cap, read=dev.pci_cfg.read, write=dev.pci_cfg.write)
            else:
                ctx.add_capability(cap)
        ctx.setup_dma(self._on_dma_map, self._on_dma_unmap)
        ctx.setup_reset(self._on_reset)
        ctx.realize()

    def _set_offloads(self, negotiated: int) -> None:
        """The device's DRIVER_OK/reset hook: the TAP hands over only what the driver took."""
        try:
            self.tap.set_offload(offload_for(negotiated))
        except OSError as exc:  # the TAP stays as it was: the device filters headers anyway
            log.warning("TUNSETOFFLOAD failed: %s", exc)

    def _set_pairs(self, pairs: int) -> None:
        """The device's VQ_PAIRS_SET/reset hook: TAP queues attached for the pairs in use."""
        for i, t in enumerate(self.extra_taps, start=1):
            try:
                t.set_queue(i < pairs)
            except OSError as exc:  # the pair then gets no RX; TX falls back to pair 0
                log.warning("TUNSETQUEUE on queue %d failed: %s", i, exc)

    def _bus_master(self) -> bool:
        cfg = self.ctx.config_space()
        return bool(cfg[PCI_COMMAND] & PCI_COMMAND_MASTER)

    # -- libvfio-user callbacks (run inside vfu_run_ctx; never raise) --------------------

    def _on_dma_map(self, region: DmaRegion) -> None:
        self.dma_maps += 1
        self.guest_iova.mapped(region.iova, region.size)
        # Regions without memory (ROM/MMIO windows) are registered too, so the domain mirrors
        # libvfio-user's list exactly; the device just cannot touch them.
        self.memory.add_region(region.iova, region.view, writable=bool(region.prot & 2),
                               size=region.size)
        self.vfu_regions[region.iova] = region.size
        self.ledger.check_region(region.iova, region.size, present=True)

    def _on_dma_unmap(self, region: DmaRegion) -> None:
        self.dma_unmaps += 1
        self.guest_iova.unmapped(region.iova, region.size)
        # The mapping disappears when this callback returns: nothing may keep a view of it.
        # libvfio-user calls this once per region inside an unmapped range.
        # Memory first, the device second, on purpose: chains the device still holds in the
        # region (a posted RX buffer, a live ring) are then revoked, counted and logged by
        # remove_range, which is the DMA-API bug a driver unmapping them commits. Told first,
        # the device would give them back quietly and the bug would go unreported.
        self.memory.remove_range(region.iova, region.size)
        # Only rings inside this region lose their views: under a vIOMMU there is one unmap
        # per guest page mapping, and dropping every ring each time would remap them all.
        self.device.dma_unmapped(region.iova, region.size)
        self.vfu_regions.pop(region.iova, None)
        self.ledger.check_region(region.iova, region.size, present=False)

    def _on_reset(self, kind: ResetType) -> None:
        self.resets[kind.name] = self.resets.get(kind.name, 0) + 1
        log.info("reset: %s", kind.name)
        # LOST_CONN needs no action here: libvfio-user only reports it from inside vfu_run_ctx
        # (which then fails with ENOTCONN: run() raises Disconnected and the loop calls
        # detached()) and from vfu_destroy_ctx at close().
        if kind != ResetType.LOST_CONN:
            self.device.reset()
            self.device.pci_cfg.reset()  # a PCI-level reset: config space registers too

    # -- loop hooks -------------------------------------------------------------------------

    def attached(self) -> None:
        """The vfio-user client has attached: start the connected clock."""
        self.connected_at = time.monotonic()

    def detached(self) -> None:
        """The vfio-user client is gone (its DMA regions are unregistered, the config space is
        back to its state at start): reset the device, so the next client finds it as new."""
        self.device.reset()
        self.device.pci_cfg.reset()
        self.ledger.check_leaks("disconnect")
        self.ledger.check_regions(self.vfu_regions.items())

    def sample_iova_space(self) -> None:
        """Remember the IOVA space's shape if it has as many regions as ever seen."""
        nregions = len(self.memory)
        if nregions >= int(self.busiest.get("regions", -1)):
            self.busiest = dict(self.memory.fragmentation())

    # -- results -----------------------------------------------------------------------------

    def drain_tap(self) -> int:
        """Read and count frames still queued on the TAP (nobody will deliver them now)."""
        scratch = memoryview(bytearray(65536 + 64))
        n = 0
        for t in (self.tap, *self.extra_taps):
            while t.attached and t.readv([scratch]) >= 0:
                n += 1
        return n

    def stats(self) -> dict[str, Any]:
        connected = time.monotonic() - self.connected_at if self.connected_at else 0.0
        result: dict[str, Any] = {
            "connected_seconds": round(connected, 3),
            "device": self.device.stats(),
            "ledger": self.ledger.stats(),
            "irq": {"sent": self.irq.sent, "unwired": self.irq.unwired},
            "dma": {"maps": self.dma_maps, "unmaps": self.dma_unmaps,
                    "regions": [[i, s, w] for i, s, w in self.memory.regions()],
                    "peak_regions": int(self.busiest.get("regions", 0)),
                    "fragmentation": self.busiest,
                    # Exact: requests libvfio-user answered with an error (WireCounters).
                    "failed_replies": self.ctx.counters.error_replies_total,
                    "last_failure": self.ctx.counters.last_error_reply},
            "vfio_user": {**self.clients.as_dict(), **self.ctx.stats()},
            # Behind a vIOMMU: the guest's own IOVA allocator, checked from outside.
            "guest_iova": self.guest_iova.report(),
            "resets": dict(self.resets),
            # The VIRTIO_PCI_CAP_PCI_CFG window: BAR accesses made through it, and refused.
            "pci_cfg": self.device.pci_cfg.stats(),
            "tap_backend": {"read_errors": sum(t.read_errors
                                               for t in (self.tap, *self.extra_taps)),
                            "write_errors": sum(t.write_errors
                                                for t in (self.tap, *self.extra_taps))},
        }
        if self.capture is not None:
            result["pcap"] = self.capture.stats()
        return result

    def final_stats(self) -> dict[str, Any]:
        """Counters at exit, with the TAP's own kernel counters taken after draining it."""
        # Everything the device still holds is released by a reset; then nothing may be live.
        self.device.reset()
        # The reset's unmaps may have left deferred erases (an injected node-allocation
        # failure): the loop's next turn would retry them, but there is none after this.
        self.ledger.settle()
        self.ledger.check_leaks("exit")
        self.ledger.check_regions(self.vfu_regions.items())
        result = self.stats()
        result["tap_undelivered_at_exit"] = self.drain_tap()
        try:
            result["tap"] = link_stats(self.cfg.tap)
        except (OSError, LookupError) as exc:
            result["tap"] = {"error": str(exc)}
        return result

    def close(self) -> None:
        self.ctx.close()
        if self.capture is not None:
            self.capture.close()
        self.tap.close()
        for t in self.extra_taps:
            t.close()
        tap_mod.destroy(self.cfg.tap)
