"""The Testbed: one reusable assembly of everything a run needs, started and stopped in one place.

A Testbed is a context manager over a private network namespace, one or more device servers
(each with its own TAP and subnet in that namespace), the host-side test peers, the QEMU machine
with its console and QMP sockets. `harness vm-test`, `harness run`, the benchmarks and the pytest
fixtures all use it, so the clean-up guarantees (harness.proc) hold everywhere: leaving the
`with` block, by return, exception, Ctrl-C or SIGTERM, stops every process and removes the
namespace.

    with Testbed(TestbedConfig(viommu=True), run_dir) as tb:
        tb.wait_console("# harness: done")
        print(tb.device.stats())
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from harness import paths
from harness.guest import kernel as guest_kernel
from harness.guest import pvh
from harness.guest.agent import GuestAgent
from harness.guest.build import build_initramfs
from harness.net.hosttap import open_in_netns
from harness.net.netns import private_netns
from harness.proc import managed, tail
from harness.virtio import features as features_mod
from harness.vm import ktap, stall
from harness.vm.accel import AccelChoice, cached_probe, choose_accel
from harness.vm.machine import Machine
from harness.vm.qemu import (
    MachinePaths,
    MachineProfile,
    builtin_net_args,
    full_args,
    vfio_user_device_spec,
)

log = logging.getLogger(__name__)

#: The guest plan of interactive testbeds (harness run, the pytest fixtures): bring the link
#: up, then idle in a shell on the console until powered off.
SHELL_CMDLINE = ("harness.plan=link_up", "harness.shell=1")

#: Where run directories of `harness run` live (each has a run.json while it runs).
RUNS_DIR = "run"


@dataclass(frozen=True)
class DeviceSpec:
    """One device server: its name (QEMU device id), TAP, host address and guest MAC."""

    name: str = "net0"
    index: int = 0

    @property
    def tap(self) -> str:
        return f"htap{self.index}"

    @property
    def host_address(self) -> str:
        return f"198.18.{self.index}.1"

    @property
    def guest_address(self) -> str:
        return f"198.18.{self.index}.2"

    @property
    def mac(self) -> str:
        return f"52:54:00:12:34:{0x56 + self.index:02x}"


@dataclass(frozen=True)
class PeerSpec:
    """The host-side test peers (TCP sink/source, UDP echo) of the guest's plan."""

    tcp_bytes: int = 64 << 20
    udp_count: int = 1000
    seed: int = 1
    timeout: float = 900.0


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that shapes a testbed; every field is a CLI option of vm-test and run."""

    __test__ = False  # not a pytest test class, despite the name

    accel: str = "auto"
    map_ops: str = "direct"
    viommu: bool = False
    faults: str | None = None
    #: Misbehaviour specs for the first device (harness.virtio.misbehave), validated.
    misbehave: tuple[str, ...] = ()
    #: True/False: every checksum/TSO offload feature on/off (the older switch, which the
    #: bench's plain/offloads configs use for both devices); None: as ``features`` says.
    offloads: bool | None = None
    #: Feature switches over the device's defaults (harness.virtio.features), e.g.
    #: "mrg_rxbuf=off,mtu=9000"; applied after ``offloads``.
    features: str = ""
    smp: int = 2
    memory_mb: int = 512
    #: Extra kernel command-line words (the guest plan's parameters).
    cmdline: tuple[str, ...] = ()
    #: "file": the console goes to console.log only; "socket": also to console.sock, where a
    #: terminal (harness run) or a test can talk to the guest's shell.
    console: str = "file"
    peers: PeerSpec | None = field(default_factory=PeerSpec)
    #: pcie-root-ports (hp0, hp1, ...) left free for device_add.
    hotplug_ports: int = 0
    #: Write every frame of the first device to this pcapng file.
    pcap: Path | None = None
    #: system_reset and guest reboots reset the machine (interactive runs) instead of ending it.
    reboot: bool = False
    #: The kernel under test (harness.guest.kernel.locate: bzImage, build tree, modules tree);
    #: None: the pinned Debian kernel.
    kernel: Path | None = None
    #: Extra kernel command-line words from the user (after the harness's own).
    append: tuple[str, ...] = ()
    #: A directory whose files are added to the initramfs at the same relative paths.
    initrd_add: Path | None = None
    #: "ours": our vfio-user device server; "builtin": QEMU's own virtio-net-pci on a TAP
    #: in the same namespace (htap0, 198.18.0.1/24, same MAC), no device server at all.
    device: str = "ours"
    #: QEMU trace events (names or globs) logged with timestamps to the run's qemu.log.
    qemu_trace: tuple[str, ...] = ()
    #: How the kernel boots (harness.guest.pvh): "auto" (its PVH entry when it has one, else
    #: the bzImage), "pvh" (or refuse), "bzimage" (through its own decompressor).
    boot: str = "auto"


#: What serves the guest's NIC: our vfio-user device, or QEMU's built-in virtio-net-pci.
DEVICES = ("ours", "builtin")


class TestbedError(ValueError):
    """The testbed cannot be built as asked (a bad --initrd-add, ...); the message says why."""

    __test__ = False  # not a pytest test class, despite the name


class ServerDied(RuntimeError):
    """A device server exited while the guest was running; carries its log tail."""


class Device:
    """A running device server: its sockets, its log, and its control channel."""

    def __init__(self, spec: DeviceSpec, run_dir: Path) -> None:
        self.spec = spec
        prefix = run_dir / spec.name
        self.socket = prefix.with_name(f"{spec.name}.sock")
        self.control = prefix.with_name(f"{spec.name}-control.sock")
        self.stats_path = prefix.with_name(f"{spec.name}-stats.json")
        self.log = prefix.with_name(f"{spec.name}-server.log")
        self.proc: Any = None

    def request(self, cmd: str, timeout: float = 10.0, **args: object) -> dict[str, Any]:
        """One control-protocol request (see harness.server.control); the reply object."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.control))
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if not isinstance(reply, dict):
            raise ValueError(f"control reply is not an object: {buf[:200]!r}")
        return reply

    def stats(self) -> dict[str, Any]:
        reply = self.request("stats")
        if not reply.get("ok"):
            raise RuntimeError(f"stats failed: {reply.get('error')}")
        stats = reply.get("stats")
        return stats if isinstance(stats, dict) else {}

    def final_stats(self) -> dict[str, Any]:
        """The counters the server wrote when it exited (empty if it did not)."""
        try:
            data = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def wait(self, timeout: float) -> bool:
        """Wait for the server to exit by itself (it does when QEMU goes away)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


def user_files(root: Path) -> dict[str, Path]:
    """Every file under root, keyed by its path relative to root (--initrd-add)."""
    if not root.is_dir():
        raise TestbedError(f"--initrd-add {root}: not a directory")
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def select_accel(requested: str, env: paths.Env) -> AccelChoice:
    cache = paths.cache_dir() / "accel-probe.json"
    return choose_accel(requested,
                        lambda: cached_probe(list(env.qemu), Path(env.kernel), cache))


class Testbed:
    """Namespace, device servers, peers and QEMU for one run; `with` starts and stops it all."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, cfg: TestbedConfig, run_dir: Path, *, env: paths.Env | None = None,
                 accel: AccelChoice | None = None) -> None:
        if cfg.device not in DEVICES:
            raise TestbedError(f"device must be one of {', '.join(DEVICES)}, not {cfg.device!r}")
        if cfg.device == "builtin" and cfg.hotplug_ports:
            raise TestbedError("hot-plug needs our device servers (device='ours')")
        try:
            #: The device features of this run (every device server gets the same).
            self.features = features_mod.resolve(cfg.features, cfg.offloads)
        except ValueError as exc:
            raise TestbedError(f"features: {exc}") from None
        self.cfg = cfg
        self.run_dir = run_dir
        self.env = env or paths.load_env()
        # Refused before anything starts when it lacks what the run needs (KernelError).
        self.kernel = guest_kernel.resolve(cfg.kernel, self.env, viommu=cfg.viommu)
        #: What -kernel gets: the bzImage or its unpacked vmlinux (BootError, a KernelError).
        self.boot = pvh.boot_image(self.kernel.image, cfg.boot, paths.cache_dir() / "pvh")
        self.user_files = user_files(cfg.initrd_add) if cfg.initrd_add else None
        self.accel = accel or select_accel(cfg.accel, self.env)
        self.devices: list[Device] = []
        self.netns = ""
        self.qmp_socket = run_dir / "qmp.sock"
        #: A second QMP monitor for people (harness qmp): the harness keeps its own.
        self.user_qmp_socket = run_dir / "qmp-user.sock"
        self.console_log = run_dir / "console.log"
        self.console_socket = run_dir / "console.sock" if cfg.console == "socket" else None
        #: The guest command channel's serial port (ttyS1 in the guest); see `guest`.
        self.agent_socket = run_dir / "agent.sock"
        self.peer_results = run_dir / "peer.json"
        self._machine: Machine | None = None
        self._guest: GuestAgent | None = None
        #: cfg.device == "builtin": the TAP fd QEMU inherits (closed here once QEMU runs).
        self._tap_fd: int | None = None
        self._stack = ExitStack()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        try:
            self.start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop QEMU, then the servers and peers, then remove the namespace (reverse order)."""
        self._stack.close()

    def start(self) -> None:
        initrd = build_initramfs(
            modules=self.kernel.modules, out=self.run_dir / "initramfs.cpio.gz",
            require=() if self.cfg.kernel is not None else None,
            files=self.user_files)
        self.netns = self._stack.enter_context(private_netns())
        if self.cfg.device == "builtin":
            spec = DeviceSpec()
            self._tap_fd = open_in_netns(self.netns, spec.tap, spec.host_address)
            self._stack.callback(os.close, self._tap_fd)
        else:
            self.add_device()
        if self.cfg.peers is not None:
            self._start_peers(self.cfg.peers)
        self._launch(initrd)

    def check_alive(self) -> None:
        """Raise ServerDied if a device server exited while the machine is up (so a run says so
        at once, with the server's log tail, instead of waiting for the guest's timeouts).

        Once QEMU has exited too, only a server that died (a signal or a failure status) is
        reported: QEMU may go down within a poll of a server it lost (QEMU 11.1 sometimes
        aborts on the lost socket), and the server is then the cause; but a server also ends
        by itself, with status 0, when its only client leaves (a guest that powered off or
        panicked), and that is no death."""
        if self._machine is None:
            return
        qemu_up = self._machine.running()
        for dev in self.devices:
            code = dev.proc.poll()
            if code is not None and (qemu_up or code != 0):
                qemu = "" if qemu_up else " (QEMU has exited too)"
                raise ServerDied(f"device server {dev.spec.name} (pid {dev.proc.pid}) died "
                                 f"with exit status {code} while the guest was running{qemu}; "
                                 f"{dev.log}:\n{tail(dev.log)}")

    @property
    def device(self) -> Device:
        """The first device (the one QEMU boots with)."""
        return self.devices[0]

    @property
    def machine(self) -> Machine:
        if self._machine is None:
            raise RuntimeError("the testbed's machine is not running")
        return self._machine

    def qmp(self, command: str, **arguments: Any) -> object:
        return self.machine.qmp(command, **arguments)

    @property
    def guest(self) -> GuestAgent:
        """Commands and files in the guest, past the device under test (harness.guest.agent):
        `tb.guest.run("ip -s link").text`. Connects on first use, and the first request waits
        for the agent while the guest boots; closed before QEMU stops."""
        if self._guest is None:
            if self._machine is None:
                raise RuntimeError("the testbed's machine is not running")
            self._guest = self._stack.enter_context(GuestAgent(self.agent_socket))
        return self._guest

    # -- parts -------------------------------------------------------------------------------

    def add_device(self) -> Device:
        """Start one more device server in the namespace (its own TAP and 198.18.N.0/24)."""
        spec = DeviceSpec(name=f"net{len(self.devices)}", index=len(self.devices))
        dev = Device(spec, self.run_dir)
        cfg = self.cfg
        argv = [sys.executable, "-m", "harness.server", "--socket", str(dev.socket),
                "--netns", self.netns, "--tap", spec.tap, "--host-address", spec.host_address,
                "--mac", spec.mac, "--map-ops", cfg.map_ops, "--control", str(dev.control),
                "--stats", str(dev.stats_path),
                *(["--access-platform"] if cfg.viommu else []),
                *(["--faults", cfg.faults] if cfg.faults else []),
                *(["--features", fspec] if (fspec := self.features.spec()) else []),
                *(["--pcap", str(cfg.pcap)] if cfg.pcap and not self.devices else []),
                *[a for m in (cfg.misbehave if not self.devices else ())
                  for a in ("--misbehave", m)]]
        dev.proc = self._stack.enter_context(managed(
            argv, dev.log, name=f"device server {spec.name}", ready="READY"))
        self.devices.append(dev)
        return dev

    def hotplug(self, dev: Device, port: int = 0) -> None:
        """device_add a vfio-user-pci for `dev` on pcie-root-port hp<port>."""
        spec = vfio_user_device_spec(dev.socket, dev.spec.name)
        self.qmp("device_add", bus=f"hp{port}", **spec)

    def _start_peers(self, peers: PeerSpec) -> None:
        argv = [sys.executable, "-m", "harness.net.peer", "--netns", self.netns, "--results",
                str(self.peer_results), "--bytes", str(peers.tcp_bytes), "--seed",
                str(peers.seed), "--udp-count", str(peers.udp_count), "--timeout",
                str(peers.timeout)]
        self._stack.enter_context(managed(argv, self.run_dir / "peer.log", name="host peer"))

    def _launch(self, initrd: Path) -> None:
        cfg = self.cfg
        profile = MachineProfile(accel=self.accel.name, memory_mb=cfg.memory_mb, smp=cfg.smp,
                                 viommu=cfg.viommu, cmdline=(*cfg.cmdline, *cfg.append),
                                 hotplug_ports=cfg.hotplug_ports, reboot=cfg.reboot,
                                 trace=cfg.qemu_trace)
        builtin = self._tap_fd is not None
        mpaths = MachinePaths(kernel=self.boot.path, initrd=initrd,
                              device_socket=self.run_dir / "net0.sock" if builtin
                              else self.device.socket, qmp_socket=self.qmp_socket,
                              console_log=self.console_log,
                              console_socket=self.console_socket,
                              user_qmp_socket=self.user_qmp_socket,
                              agent_socket=self.agent_socket)
        device = None if self._tap_fd is None else builtin_net_args(
            self._tap_fd, DeviceSpec().mac, viommu=cfg.viommu, offloads=self.features.offloads)
        argv = full_args(list(self.env.qemu), profile, mpaths, device)
        (self.run_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
        machine = Machine(argv, qmp_socket=self.qmp_socket, log_path=self.run_dir / "qemu.log",
                          pass_fds=() if self._tap_fd is None else (self._tap_fd,))
        self._stack.enter_context(machine)
        machine.launch()
        self._machine = machine

    def diagnose_stall(self) -> str:
        """A stalled boot (stall.BootStalled): where QEMU's vCPUs are and what the first device
        saw, as one line; the whole QMP report goes to boot-stall.txt in the run directory."""
        summary, report = stall.diagnose(self.machine.ask, symbols=self._symbols())
        seen = "QEMU's built-in device"
        if self.devices:
            # Its resets tell whether the guest's driver got as far as probing it (a reset is
            # the first thing virtio does with a device).
            try:
                dev = self.device.stats().get("device", {})
                resets = dev.get("resets", "?")
                # QEMU resets the device once as the machine starts; a driver resets it first
                # thing when it probes.
                probed = ("" if not isinstance(resets, int) or resets > 1
                          else " (only QEMU's at start: no driver has probed it)")
                seen = (f"device {self.device.spec.name}: {resets} resets{probed}, "
                        f"status {dev.get('status', '?')}")
            except (OSError, RuntimeError, ValueError) as exc:
                seen = f"device {self.device.spec.name}: no stats ({exc})"
        path = self.run_dir / "boot-stall.txt"
        path.write_text(f"{summary}\n{seen}\n\n{report}")
        log.error("boot stalled: %s; %s (details in %s)", summary, seen, path)
        return f"{summary}; {seen}; {path.name} has QEMU's view"

    def _symbols(self) -> stall.SymbolMap | None:
        """The kernel's System.map, when its addresses are the ones running: not relocated by
        KASLR (the PVH entry skips the decompressor that relocates; or nokaslr; or a kernel
        built without it)."""
        cmdline = (*self.cfg.cmdline, *self.cfg.append)
        config = self.kernel.config  # empty: unknown, so assume KASLR
        fixed = (self.boot.mode == "pvh" or "nokaslr" in cmdline
                 or (bool(config) and config.get("CONFIG_RANDOMIZE_BASE") != "y"))
        return stall.SymbolMap.load(self.kernel.system_map) if fixed else None

    # -- the console -------------------------------------------------------------------------

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_shell(self, timeout: float) -> None:
        """For a SHELL_CMDLINE guest: its command channel answers and its link_up step ran
        (the interface has its address), so tests can use the network at once."""
        try:
            self.guest.wait_ready(timeout)
            self.wait_console(ktap.DONE, timeout)
        except TimeoutError as exc:  # AgentNotReady is one too
            if ktap.HEADER in self.console_text():
                raise
            raise stall.BootStalled(f"{exc}; the guest's boot stalled (no KTAP header from "
                                    f"/init): {self.diagnose_stall()}") from None

    def wait_console(self, pattern: str, timeout: float, *, start: int = 0) -> str:
        """Wait until `pattern` appears in the console log (after offset `start`); raise
        TimeoutError, or RuntimeError if QEMU exits first. Returns the console text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text()
            if pattern in text[start:]:
                return text
            if not self.machine.running():
                raise RuntimeError(f"QEMU exited before the console showed {pattern!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the console did not show {pattern!r} within {timeout:.0f} s")
            time.sleep(0.1)

