"""The device process: serves one virtio-net PCI device over vfio-user, backed by a TAP.

One thread, one non-blocking event loop over three kinds of fd: libvfio-user's socket (config
space, BAR accesses, doorbells, DMA map/unmap, reset), the TAP (frames for the guest, polled
only while the guest has posted receive buffers) and an optional control socket that answers
JSON requests (`stats`, `quit`). Doorbells only mark queues; the queue work runs once per loop
turn, after every pending vfio-user message has been handled, so it is batched.

Run as `python -m harness.server --socket PATH [--netns NAME] ...`; it prints `READY` on
stdout once QEMU may connect, and writes its final counters to `--stats` when QEMU goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import argtypes
from harness.dma import MAPOPS_KINDS, FaultSpec, GuestMemory, build_mapops
from harness.net import netns as netns_mod
from harness.net import tap as tap_mod
from harness.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap, configure, link_stats
from harness.vfu import (
    Disconnected,
    DmaRegion,
    ResetType,
    VfuContext,
    VfuError,
    memory_barrier,
)
from harness.virtio.constants import F_ACCESS_PLATFORM
from harness.virtio.net import DEFAULT_FEATURES, OFFLOAD_FEATURES, VirtioNetDevice

log = logging.getLogger("harness.server")

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
    #: Offer checksum and TSO offloads (the vnet header passes through to the TAP unchanged).
    offloads: bool = False


class ErrorCounter(logging.Handler):
    """Counts libvfio-user's error lines: each is a request it refused (a failed reply)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.count = 0
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.last = record.getMessage()


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
        tap_mod.create(cfg.tap)
        # What the kernel may hand us unsegmented and without checksums: only what the guest
        # can take (GUEST_CSUM/GUEST_TSO*), and only when offloads are offered at all.
        self.tap = Tap(cfg.tap, offload=(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                       if cfg.offloads else 0)
        configure(cfg.tap, cfg.host_address, cfg.prefixlen)
        self.memory = GuestMemory()
        self.ctx = VfuContext(str(cfg.socket))
        self.irq = Irq(self.ctx)
        faults = FaultSpec.parse(cfg.faults) if cfg.faults else None
        self.mapops, ledger = build_mapops(cfg.map_ops, self.memory,
                                           bus_master=self._bus_master, faults=faults)
        assert ledger is not None
        self.ledger = ledger
        # libvfio-user's view of the regions (iova -> size), to check the domain against.
        self.vfu_regions: dict[int, int] = {}
        features = DEFAULT_FEATURES
        if cfg.access_platform:
            features |= 1 << F_ACCESS_PLATFORM
        if cfg.offloads:
            features |= OFFLOAD_FEATURES
        self.device = VirtioNetDevice(
            self.mapops, self.irq, self.tap, mac=cfg.mac, queue_size=cfg.queue_size,
            features=features, bus_master=self._bus_master, barrier=memory_barrier)
        self.dma_maps = 0
        self.dma_unmaps = 0
        self.device_resets_seen = 0
        self.resets: dict[str, int] = {}
        self.vfu_errors = ErrorCounter()
        logging.getLogger("harness.vfu.libvfio_user").addHandler(self.vfu_errors)
        # The IOVA space as the device saw it at its busiest (most regions), sampled.
        self.busiest: dict[str, Any] = {}
        self._next_sample = 0.0
        self.connected_at: float | None = None
        self.stop = False
        self._setup_pci()
        self.sel = selectors.DefaultSelector()
        self.control: socket.socket | None = None
        if cfg.control is not None:
            with contextlib.suppress(FileNotFoundError):
                cfg.control.unlink()
            self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.control.bind(str(cfg.control))
            self.control.listen(4)
            self.control.setblocking(False)

    # -- set-up --------------------------------------------------------------------------

    def _setup_pci(self) -> None:
        ctx, dev = self.ctx, self.device
        ctx.set_ids(VIRTIO_VENDOR, VIRTIO_NET_DEVICE_ID, VIRTIO_VENDOR, VIRTIO_SUBSYS_NET)
        ctx.set_class(0x02, 0x00, 0x00)
        ctx.set_revision(1)
        ctx.setup_region(0, dev.bar0_size, dev.bar0_read, dev.bar0_write)
        ctx.setup_msix(dev.msix_vectors, table_bar=1, pba_bar=1)
        for cap in dev.caps:
            ctx.add_capability(cap)
        ctx.setup_dma(self._on_dma_map, self._on_dma_unmap)
        ctx.setup_reset(self._on_reset)
        ctx.realize()

    def _bus_master(self) -> bool:
        cfg = self.ctx.config_space()
        return bool(cfg[PCI_COMMAND] & PCI_COMMAND_MASTER)

    # -- libvfio-user callbacks (run inside vfu_run_ctx; never raise) --------------------

    def _on_dma_map(self, region: DmaRegion) -> None:
        self.dma_maps += 1
        # Regions without memory (ROM/MMIO windows) are registered too, so the domain mirrors
        # libvfio-user's list exactly; the device just cannot touch them.
        self.memory.add_region(region.iova, region.view, writable=bool(region.prot & 2),
                               size=region.size)
        self.vfu_regions[region.iova] = region.size
        self.ledger.check_region(region.iova, region.size, present=True)

    def _on_dma_unmap(self, region: DmaRegion) -> None:
        self.dma_unmaps += 1
        # The mapping disappears when this callback returns: nothing may keep a view of it.
        # libvfio-user calls this once per region inside an unmapped range.
        self.memory.remove_range(region.iova, region.size)
        # Only rings inside this region lose their views: under a vIOMMU there is one unmap
        # per guest page mapping, and dropping every ring each time would remap them all.
        self.device.dma_unmapped(region.iova, region.size)
        self.vfu_regions.pop(region.iova, None)
        self.ledger.check_region(region.iova, region.size, present=False)

    def _on_reset(self, kind: ResetType) -> None:
        self.resets[kind.name] = self.resets.get(kind.name, 0) + 1
        log.info("reset: %s", kind.name)
        if kind == ResetType.LOST_CONN:
            self.stop = True
        else:
            self.device.reset()

    # -- event loop ------------------------------------------------------------------------

    def serve(self) -> None:
        """Wait for QEMU, then serve until it disconnects or we are told to stop."""
        if self.control is not None:
            self.sel.register(self.control, selectors.EVENT_READ, "control")
        print("READY", flush=True)
        self._wait_for_client()
        if self.stop:
            return
        self.connected_at = time.monotonic()
        log.info("vfio-user client connected")
        vfu_fd = self.ctx.fileno()
        self.sel.register(vfu_fd, selectors.EVENT_READ, "vfu")
        tap_registered = False
        while not self.stop:
            # TX stops after a batch so RX gets a turn: poll without sleeping while work is left.
            timeout = 0.0 if self.device.has_work() else 1.0
            for key, _ in self.sel.select(timeout=timeout):
                if key.data == "vfu":
                    try:
                        self.ctx.run()
                    except Disconnected:
                        log.info("vfio-user client disconnected")
                        self.stop = True
                        break
                elif key.data == "tap":
                    self.device.on_backend_readable()
                elif key.data == "control":
                    self._control_accept()
            if self.stop:
                break
            self.device.process()
            self.mapops.housekeeping()  # type: ignore[attr-defined]
            now = time.monotonic()
            if now >= self._next_sample:
                self._sample_iova_space()
                self._next_sample = now + 0.5
            if self.device.resets != self.device_resets_seen:
                # The guest reset the device (status 0): every mapping must be gone by now.
                self.device_resets_seen = self.device.resets
                self.ledger.check_leaks("reset")
            want = self.device.rx_wanted()
            if want != tap_registered:
                if want:
                    self.sel.register(self.tap.fileno(), selectors.EVENT_READ, "tap")
                    # Frames may already be waiting: take them now, not one loop turn later.
                    self.device.on_backend_readable()
                else:
                    self.sel.unregister(self.tap.fileno())
                tap_registered = want

    def _sample_iova_space(self) -> None:
        nregions = len(self.memory)
        if nregions >= int(self.busiest.get("regions", -1)):
            self.busiest = dict(self.memory.fragmentation())

    def _wait_for_client(self) -> None:
        while not self.stop:
            if self.ctx.attach():
                return
            listen_fd = self.ctx.fileno()
            key = self.sel.register(listen_fd, selectors.EVENT_READ, "listen")
            try:
                for k, _ in self.sel.select(timeout=1.0):
                    if k.data == "control":
                        self._control_accept()
            finally:
                self.sel.unregister(key.fileobj)

    # -- control socket --------------------------------------------------------------------

    def _control_accept(self) -> None:
        assert self.control is not None
        try:
            conn, _ = self.control.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(2.0)
            try:
                line = conn.makefile("rb").readline()
                request = json.loads(line or b"{}")
                reply = self._control(request)
            except (OSError, ValueError) as exc:
                reply = {"error": str(exc)}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "stats":
            return self.stats()
        if cmd == "quit":
            self.stop = True
            return {"ok": True}
        return {"error": f"unknown command {cmd!r}"}

    # -- results -----------------------------------------------------------------------------

    def drain_tap(self) -> int:
        """Read and count frames still queued on the TAP (nobody will deliver them now)."""
        scratch = memoryview(bytearray(65536 + 64))
        n = 0
        while self.tap.readv([scratch]) >= 0:
            n += 1
        return n

    def stats(self) -> dict[str, Any]:
        connected = time.monotonic() - self.connected_at if self.connected_at else 0.0
        return {
            "connected_seconds": round(connected, 3),
            "device": self.device.stats(),
            "ledger": self.ledger.stats(),
            "irq": {"sent": self.irq.sent, "unwired": self.irq.unwired},
            "dma": {"maps": self.dma_maps, "unmaps": self.dma_unmaps,
                    "regions": [[i, s, w] for i, s, w in self.memory.regions()],
                    "peak_regions": int(self.busiest.get("regions", 0)),
                    "fragmentation": self.busiest,
                    "failed_replies": self.vfu_errors.count,
                    "last_failure": self.vfu_errors.last},
            "resets": dict(self.resets),
            "tap_backend": {"read_errors": self.tap.read_errors,
                            "write_errors": self.tap.write_errors},
        }

    def final_stats(self) -> dict[str, Any]:
        """Counters at exit, with the TAP's own kernel counters taken after draining it."""
        # Everything the device still holds is released by a reset; then nothing may be live.
        self.device.reset()
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
        self.tap.close()
        tap_mod.destroy(self.cfg.tap)
        if self.control is not None:
            self.control.close()
            with contextlib.suppress(FileNotFoundError):
                if self.cfg.control is not None:
                    self.cfg.control.unlink()


def write_json(path: Path, data: object) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="harness-server", description=__doc__.split("\n")[0])
    p.add_argument("--socket", type=Path, required=True, help="vfio-user socket path")
    p.add_argument("--netns", help="network namespace to enter first (must exist)")
    p.add_argument("--tap", default="htap0", help="TAP device name (default htap0)")
    p.add_argument("--host-address", default="198.18.0.1")
    p.add_argument("--prefixlen", type=int, default=24)
    p.add_argument("--mac", type=argtypes.mac, default=argtypes.mac("52:54:00:12:34:56"))
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--map-ops", choices=MAPOPS_KINDS, default="direct")
    p.add_argument("--faults", type=argtypes.fault_spec, help="fault injection spec, e.g. "
                   "mapping-error=0.01,iova-alloc=0.05,max-mapping-size=4096,seed=7")
    p.add_argument("--access-platform", action="store_true",
                   help="offer VIRTIO_F_ACCESS_PLATFORM (for a guest behind a vIOMMU)")
    p.add_argument("--offloads", action="store_true",
                   help="offer CSUM/GUEST_CSUM and TSO4/6 both ways (vnet header passthrough)")
    p.add_argument("--control", type=Path, help="control socket path (JSON lines)")
    p.add_argument("--stats", type=Path, help="write final counters here at exit")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    if a.queue_size < 2 or a.queue_size > 32768 or a.queue_size & (a.queue_size - 1):
        p.error("--queue-size must be a power of two between 2 and 32768")
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return ServerConfig(socket=a.socket, tap=a.tap, netns=a.netns, host_address=a.host_address,
                        prefixlen=a.prefixlen, mac=a.mac, queue_size=a.queue_size,
                        map_ops=a.map_ops, control=a.control, stats=a.stats,
                        access_platform=a.access_platform, faults=a.faults,
                        offloads=a.offloads)


def raise_fd_limit() -> None:
    """Every DMA region keeps its own fd and mmap; under a vIOMMU there is one per guest page
    mapping, so the default soft limit of 1024 fds is far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    raise_fd_limit()
    try:
        if cfg.netns:
            netns_mod.enter(cfg.netns)
    except OSError as exc:
        log.error("cannot enter network namespace %r: %s", cfg.netns, exc)
        return 1
    try:
        server = DeviceServer(cfg)
    except (OSError, VfuError, ValueError) as exc:
        log.error("could not start the device: %s", exc)
        return 1

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        server.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve()
    finally:
        if cfg.stats is not None:
            write_json(cfg.stats, server.final_stats())
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
