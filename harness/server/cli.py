"""The device process's entry point: parses its options and wires assembly, loop and control.

Run as `python -m harness.server --socket PATH [--netns NAME] ...` (or `harness serve ...`); it
prints `READY` on stdout once QEMU may connect, serves until QEMU goes away (with
`--serve-forever`: never; the next client is served), `quit` arrives on the control socket or
SIGTERM/SIGINT/SIGHUP, and then writes its final counters to `--stats` and removes its TAP.
A vfio-user client that fails (a bad VERSION, a broken message) is logged, counted and dropped;
it never ends the process.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import resource
import signal
import sys
from pathlib import Path

from pyroute2 import NetlinkError

from harness import argtypes
from harness.dma import MAPOPS_KINDS
from harness.net import netns as netns_mod
from harness.server import switches
from harness.server.assembly import DeviceServer, ServerConfig
from harness.server.control import ControlServer, device_commands
from harness.server.loop import DeviceLoop
from harness.vfu import VfuError
from harness.virtio import features as features_mod
from harness.virtio.misbehave import spec_list

log = logging.getLogger(__name__)

#: Signals that end the run cleanly: the loop stops, --stats is written, the TAP removed.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def write_json(path: Path, data: object) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(
            f"not a log level: {text!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return level


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def argtypes_features(text: str) -> str:
    """A --features value, checked now (harness.virtio.features) so a typo is a usage line."""
    try:
        features_mod.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_args(argv: list[str] | None) -> tuple[ServerConfig, str]:
    """Options -> (config, log level); a bad value exits 2 with a usage line."""
    p = argparse.ArgumentParser(prog="harness-server",
                                description="Serve one virtio-net device over vfio-user.")
    p.add_argument("--socket", type=Path, required=True, help="vfio-user socket path")
    p.add_argument("--netns", help="network namespace to enter first (must exist)")
    p.add_argument("--tap", default="htap0", help="TAP device name (default htap0)")
    p.add_argument("--host-address", type=_address, default="198.18.0.1")
    p.add_argument("--prefixlen", type=int, default=24)
    p.add_argument("--mac", type=argtypes.mac, default=argtypes.mac("52:54:00:12:34:56"))
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--map-ops", choices=MAPOPS_KINDS, default="direct")
    p.add_argument("--faults", type=argtypes.fault_spec, help="fault injection spec, e.g. "
                   "mapping-error=0.01,iova-alloc=0.05,max-mapping-size=4096,seed=7")
    p.add_argument("--access-platform", action="store_true",
                   help="offer VIRTIO_F_ACCESS_PLATFORM (for a guest behind a vIOMMU)")
    p.add_argument("--offloads", action="store_true",
                   help="offer CSUM/GUEST_CSUM and TSO4/6 both ways (on by default now; the "
                   "same as --features offloads=on)")
    p.add_argument("--features", type=argtypes_features, default="", metavar="NAME=on|off,...",
                   help="feature switches over the defaults, like QEMU device properties: "
                   "csum, guest_csum, host_tso4/6, guest_tso4/6, mrg_rxbuf, event_idx, "
                   "indirect, status, mac, offloads (all on by default), mtu=N (default off)")
    p.add_argument("--control", type=Path, help="control socket path (JSON lines)")
    p.add_argument("--stats", type=Path, help="write final counters here at exit")
    p.add_argument("--pcap", type=Path, help="capture every frame between guest and TAP to "
                   "this pcapng file (Ethernet, direction in epb_flags, vnet header stripped)")
    p.add_argument("--serve-forever", action="store_true",
                   help="keep serving vfio-user clients after one leaves (default: the first "
                   "client that attached and left ends the process)")
    p.add_argument("--client-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="drop a vfio-user client that takes longer than this to finish a "
                   "message or read a reply (default 5)")
    p.add_argument("--misbehave", type=spec_list, action="append", default=[],
                   metavar="CASE[:after=N][:queue=Q][:always]",
                   help="break the virtio spec in this named way (repeatable or a comma "
                   "list; see harness.virtio.misbehave.CASES)")
    p.add_argument("--log-level", type=_log_level, default="INFO")
    a = p.parse_args(argv)
    if a.queue_size < 2 or a.queue_size > 32768 or a.queue_size & (a.queue_size - 1):
        p.error("--queue-size must be a power of two between 2 and 32768")
    if not 0 < a.client_timeout <= 3600:
        p.error("--client-timeout must be more than 0 and at most 3600 seconds")
    max_prefix = ipaddress.ip_address(a.host_address).max_prefixlen
    if not 0 <= a.prefixlen <= max_prefix:
        p.error(f"--prefixlen must be between 0 and {max_prefix} for {a.host_address}")
    cfg = ServerConfig(socket=a.socket, tap=a.tap, netns=a.netns, host_address=a.host_address,
                       prefixlen=a.prefixlen, mac=a.mac, queue_size=a.queue_size,
                       map_ops=a.map_ops, control=a.control, stats=a.stats,
                       access_platform=a.access_platform, faults=a.faults,
                       offloads=a.offloads, features=a.features, pcap=a.pcap,
                       serve_forever=a.serve_forever,
                       client_timeout=a.client_timeout, misbehave=tuple(a.misbehave))
    return cfg, a.log_level


def raise_fd_limit() -> None:
    """Every DMA region keeps its own fd and mmap; under a vIOMMU there is one per guest page
    mapping, so the default soft limit of 1024 fds is far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop_on_signals(loop: DeviceLoop) -> None:
    """SIGTERM, SIGINT and SIGHUP stop the loop at its next event or idle timeout (the
    handler only sets a flag: nothing is interrupted halfway, and clean-up still runs)."""

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        loop.request_stop()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)


def main(argv: list[str] | None = None) -> int:
    cfg, level = parse_args(argv)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raise_fd_limit()
    try:
        if cfg.netns:
            netns_mod.enter(cfg.netns)
    except OSError as exc:
        log.error("cannot enter network namespace %r: %s", cfg.netns, exc)
        return 1
    try:
        switches.read_all()  # a mistyped HARNESS_* switch: the one line below, not a traceback
        server = DeviceServer(cfg)
    except (OSError, VfuError, ValueError, NetlinkError) as exc:
        log.error("could not start the device: %s", exc)
        return 1
    loop = DeviceLoop(server.ctx, server.device, server.ledger, server.backend,
                      on_attached=server.attached, on_detached=server.detached,
                      sample_iova=server.sample_iova_space, serve_forever=cfg.serve_forever,
                      clients=server.clients, extra_backends=server.extra_backends)
    try:
        if cfg.control is not None:
            loop.control = ControlServer.listen(
                cfg.control, device_commands(stats=server.stats, stop=loop.request_stop,
                                             dump_queue=server.device.dump_queue,
                                             link=server.device.set_link,
                                             misbehave=server.device.add_misbehaviour,
                                             announce=server.device.announce))
    except OSError as exc:
        log.error("could not open the control socket: %s", exc)
        loop.close()
        server.close()
        return 1

    stop_on_signals(loop)
    try:
        print("READY", flush=True)
        loop.serve()
    finally:
        if cfg.stats is not None:
            write_json(cfg.stats, server.final_stats())
        if loop.control is not None:
            loop.control.close()
        loop.close()
        server.close()
    return 0
