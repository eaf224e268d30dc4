"""QEMU command lines as pure functions: a machine profile in, an argv list out.

Nothing here starts a process; `harness.vm.machine` does. Keeping argv construction pure lets the
unit tests compare lists, and lets a user print the exact command (`harness vm-test --dry-run`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

#: The accelerators the harness knows how to run.
ACCELERATORS = ("kvm", "tcg")
#: A QEMU trace event name or glob (``-trace help`` lists them); nothing QEMU would read as
#: another ``-trace`` option (``,``, ``=``).
TRACE_EVENT = re.compile(r"[A-Za-z0-9_*?]+")


@dataclass(frozen=True)
class MachineProfile:
    """What kind of guest to boot; everything that changes the QEMU command line."""

    accel: str = "tcg"
    memory_mb: int = 512
    smp: int = 2
    viommu: bool = False
    #: Extra kernel command-line words (test plan parameters and the like).
    cmdline: tuple[str, ...] = ()
    #: Free pcie-root-ports (ids hp0, hp1, ...) for devices added at run time (device_add).
    hotplug_ports: int = 0
    #: Resets (QMP system_reset, a guest reboot) reset the machine instead of ending QEMU.
    #: Off for test plans, where a guest panic (panic=-1 reboots) must end the run.
    reboot: bool = False
    #: QEMU trace events to enable (names or patterns like ``vfio_user_*``), logged with
    #: wall-clock timestamps to QEMU's log (``-msg timestamp=on``).
    trace: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.accel not in ACCELERATORS:
            raise ValueError(f"accelerator must be one of {ACCELERATORS}, not {self.accel!r}")
        if self.memory_mb < 128:
            raise ValueError("the guest needs at least 128 MiB of RAM")
        if self.smp < 1:
            raise ValueError("smp must be >= 1")
        for event in self.trace:
            if not TRACE_EVENT.fullmatch(event):
                raise ValueError(f"not a QEMU trace event name or pattern: {event!r}")


@dataclass(frozen=True)
class MachinePaths:
    """Where the machine's files live: inputs (kernel, initrd) and run-time sockets and logs."""

    kernel: Path
    initrd: Path
    device_socket: Path
    qmp_socket: Path
    console_log: Path
    #: When set, the console is also a unix socket (the log file still records everything).
    console_socket: Path | None = None
    #: A second QMP monitor, for people (`harness qmp`); the harness keeps the first.
    user_qmp_socket: Path | None = None
    #: The guest command channel (harness.guest.agent): a second serial port, ttyS1.
    agent_socket: Path | None = None


def machine_args(profile: MachineProfile) -> list[str]:
    """The machine itself: q35 with guest RAM shared through a memfd, nothing we did not ask for.

    Guest RAM must be shared (`share=on`) because the device process reads and writes it
    through the fds that arrive with DMA_MAP; message-based DMA is not used.
    """
    machine = "q35,memory-backend=mem"
    if profile.viommu:
        # The intel-iommu needs the split irqchip for interrupt remapping under KVM;
        # under TCG the option is harmless.
        machine += ",kernel-irqchip=split"
    cpu = "host" if profile.accel == "kvm" else "max"
    return [
        "-nodefaults",
        "-machine", machine,
        "-accel", profile.accel,
        "-cpu", cpu,
        "-smp", str(profile.smp),
        "-m", f"{profile.memory_mb}M",
        "-object", f"memory-backend-memfd,id=mem,size={profile.memory_mb}M,share=on",
        "-display", "none",
        "-vga", "none",
        "-nic", "none",
        *([] if profile.reboot else ["-no-reboot"]),
    ]


def viommu_args(profile: MachineProfile) -> list[str]:
    """An emulated Intel IOMMU that reports every guest mapping (caching-mode=on).

    It must be created before the devices that sit behind it, so it comes first.
    """
    if not profile.viommu:
        return []
    return ["-device", "intel-iommu,caching-mode=on,intremap=on"]


def kernel_args(kernel: Path, initrd: Path, cmdline: str) -> list[str]:
    """Direct kernel boot: no firmware disk, no bootloader."""
    return ["-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]


def console_args(log: Path, sock: Path | None = None) -> list[str]:
    """The serial console (ttyS0) goes to a file that the host parses; with `sock`, QEMU also
    listens there for one client (a terminal), and the file still gets every byte."""
    if sock is None:
        return ["-chardev", f"file,id=console,path={log}", "-serial", "chardev:console"]
    return ["-chardev", f"socket,id=console,path={sock},server=on,wait=off,logfile={log}",
            "-serial", "chardev:console"]


def agent_args(sock: Path | None) -> list[str]:
    """The guest agent's serial port: it must come after the console's -serial, so that the
    console stays ttyS0 (COM1) and the agent gets ttyS1 (COM2)."""
    if sock is None:
        return []
    return ["-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
            "-serial", "chardev:agent"]


def qmp_args(socket_path: Path, user_socket: Path | None = None) -> list[str]:
    """A QMP socket that QEMU listens on; the harness connects after launch. A second one
    for people, so that an interactive session never takes the harness's own monitor."""
    args = ["-qmp", f"unix:{socket_path},server=on,wait=off"]
    if user_socket is not None:
        args += ["-qmp", f"unix:{user_socket},server=on,wait=off"]
    return args


def trace_args(events: tuple[str, ...]) -> list[str]:
    """QEMU trace events on from the start, each line timestamped (UTC, microseconds)."""
    if not events:
        return []
    return ["-msg", "timestamp=on", *[a for e in events for a in ("-trace", f"enable={e}")]]


def hotplug_port_args(count: int) -> list[str]:
    """Empty pcie-root-ports hp0..hp<count-1> for device_add (q35 has no hot-plug slot else)."""
    args = []
    for i in range(count):
        args += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},slot={i + 1}"]
    return args


def vfio_user_device_spec(socket_path: Path, device_id: str = "net0") -> dict[str, object]:
    """The properties of a vfio-user-pci device whose server listens at socket_path."""
    return {"driver": "vfio-user-pci", "id": device_id,
            "socket": {"type": "unix", "path": str(socket_path)}}


def vfio_user_device_args(socket_path: Path, device_id: str = "net0") -> list[str]:
    """The vfio-user-pci device whose server is our Python process."""
    spec = vfio_user_device_spec(socket_path, device_id)
    return ["-device", json.dumps(spec, separators=(",", ":"))]


#: QEMU's virtio-net offload properties, all off unless the run offers offloads; on, the
#: same set our device offers (CSUM, GUEST_CSUM, HOST/GUEST_TSO4/6), nothing more.
_BUILTIN_OFFLOADS = ("csum", "guest_csum", "host_tso4", "host_tso6", "guest_tso4", "guest_tso6")
_BUILTIN_NEVER = ("gso", "host_ufo", "guest_ufo", "host_tunnel_csum", "guest_tunnel_csum")


def builtin_net_args(tap_fd: int, mac: str, *, viommu: bool = False,
                     offloads: bool = False, device_id: str = "net0") -> list[str]:
    """QEMU's own virtio-net-pci on a TAP fd the harness opened in the run's namespace (the
    reference side of `harness bench net`); same MAC and feature set as our device, and
    modern-only (PCI id 0x1041) like it: iommu_platform=on needs that anyway."""
    props = [f"{p}={'on' if offloads else 'off'}" for p in _BUILTIN_OFFLOADS]
    props += [f"{p}=off" for p in _BUILTIN_NEVER]
    if viommu:
        props.append("iommu_platform=on")
    return ["-netdev", f"tap,id=n0,fd={tap_fd},vhost=off",
            "-device", ",".join(["virtio-net-pci", "netdev=n0", f"id={device_id}",
                                 "disable-legacy=on", f"mac={mac}", *props])]


def kernel_cmdline(profile: MachineProfile, *, quiet: bool = True) -> str:
    """The guest kernel command line: serial console, no reboot on panic, the test plan."""
    # no_timer_check: Linux's boot-time check that the timer interrupt arrives through the
    # IO-APIC busy-waits a few ticks; under TCG on a loaded host it can miss them, and with the
    # vIOMMU's interrupt remapping there is no fallback: "Kernel panic - not syncing: timer
    # doesn't work through Interrupt-remapped IO-APIC" (seen once, 2026-12-01). The timer works.
    words = ["console=ttyS0", "panic=-1", "reboot=t", "no_timer_check"]
    # tsc=nowatchdog: the clocksource watchdog rewritten in 7.x checks the TSC of another CPU
    # with interrupts off and times the wait on the timekeeping clock, which until ~1.7 s into
    # boot is jiffies. If that other CPU is then in stop_machine() for the clocksource switch,
    # nothing advances jiffies and both vCPUs spin for ever, silently (2026-12-01, 7.3.4 on a
    # 2-core TCG host: 2 boots of about 600 in two suite runs, 1 of 267 in stress runs; QEMU's
    # registers at the hang: CPU0 in watchdog_check_skew, CPU1 in multi_cpu_stop; see
    # harness.vm.stall). Under TCG every vCPU's TSC is the one host clock, so there is no
    # skew to watch for. A user's own tsc= word replaces this one.
    if not any(w.startswith("tsc=") for w in profile.cmdline):
        words.append("tsc=nowatchdog")
    if quiet:
        words.append("quiet")
    if profile.viommu:
        words += ["intel_iommu=on", "iommu.strict=1"]
    words += profile.cmdline
    return " ".join(words)


def full_args(qemu: list[str], profile: MachineProfile, paths: MachinePaths,
              device: list[str] | None = None) -> list[str]:
    """The whole command line for one harness run; `device` replaces our vfio-user-pci."""
    return [
        *qemu,
        *machine_args(profile),
        *viommu_args(profile),
        *kernel_args(paths.kernel, paths.initrd, kernel_cmdline(profile)),
        *console_args(paths.console_log, paths.console_socket),
        *agent_args(paths.agent_socket),
        *qmp_args(paths.qmp_socket, paths.user_qmp_socket),
        *(vfio_user_device_args(paths.device_socket) if device is None else device),
        *hotplug_port_args(profile.hotplug_ports),
        *trace_args(profile.trace),
    ]
