"""QEMU command lines as pure functions: a machine profile in, an argv list out.

Nothing here starts a process; `harness.vm.machine` does. Keeping argv construction pure lets the
unit tests compare lists, and lets a user print the exact command (`harness vm-test --dry-run`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: The accelerators the harness knows how to run.
ACCELERATORS = ("kvm", "tcg")


@dataclass(frozen=True)
class MachineProfile:
    """What kind of guest to boot; everything that changes the QEMU command line."""

    accel: str = "tcg"
    memory_mb: int = 512
    smp: int = 2
    viommu: bool = False
    #: Extra kernel command-line words (test plan parameters and the like).
    cmdline: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.accel not in ACCELERATORS:
            raise ValueError(f"accelerator must be one of {ACCELERATORS}, not {self.accel!r}")
        if self.memory_mb < 128:
            raise ValueError("the guest needs at least 128 MiB of RAM")
        if self.smp < 1:
            raise ValueError("smp must be >= 1")


@dataclass(frozen=True)
class MachinePaths:
    """Where the machine's files live: inputs (kernel, initrd) and run-time sockets and logs."""

    kernel: Path
    initrd: Path
    device_socket: Path
    qmp_socket: Path
    console_log: Path


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
        "-no-reboot",
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


def console_args(log: Path) -> list[str]:
    """The serial console (ttyS0) goes to a file that the host parses."""
    return ["-chardev", f"file,id=console,path={log}", "-serial", "chardev:console"]


def qmp_args(socket_path: Path) -> list[str]:
    """A QMP socket that QEMU listens on; the harness connects after launch."""
    return ["-qmp", f"unix:{socket_path},server=on,wait=off"]


def vfio_user_device_args(socket_path: Path, device_id: str = "net0") -> list[str]:
    """The vfio-user-pci device whose server is our Python process."""
    spec = {"driver": "vfio-user-pci", "id": device_id,
            "socket": {"type": "unix", "path": str(socket_path)}}
    return ["-device", json.dumps(spec, separators=(",", ":"))]


def kernel_cmdline(profile: MachineProfile, *, quiet: bool = True) -> str:
    """The guest kernel command line: serial console, no reboot on panic, the test plan."""
    words = ["console=ttyS0", "panic=-1", "reboot=t"]
    if quiet:
        words.append("quiet")
    if profile.viommu:
        words += ["intel_iommu=on", "iommu.strict=1"]
    words += profile.cmdline
    return " ".join(words)


def full_args(qemu: list[str], profile: MachineProfile, paths: MachinePaths) -> list[str]:
    """The whole command line for one harness run."""
    return [
        *qemu,
        *machine_args(profile),
        *viommu_args(profile),
        *kernel_args(paths.kernel, paths.initrd, kernel_cmdline(profile)),
        *console_args(paths.console_log),
        *qmp_args(paths.qmp_socket),
        *vfio_user_device_args(paths.device_socket),
    ]
