"""QEMU command lines are pure functions: compare lists."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from harness.vm.qemu import (
    MachinePaths,
    MachineProfile,
    full_args,
    kernel_cmdline,
    machine_args,
    vfio_user_device_args,
    viommu_args,
)


def test_machine_shares_ram_through_memfd() -> None:
    args = machine_args(MachineProfile(memory_mb=512))
    assert args[args.index("-object") + 1] == "memory-backend-memfd,id=mem,size=512M,share=on"
    assert args[args.index("-machine") + 1] == "q35,memory-backend=mem"
    assert "-nodefaults" in args and args[args.index("-nic") + 1] == "none"


def test_tcg_uses_max_cpu_kvm_uses_host() -> None:
    assert "max" in machine_args(MachineProfile(accel="tcg"))
    assert "host" in machine_args(MachineProfile(accel="kvm"))


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(ValueError, match="accelerator"):
        MachineProfile(accel="hvf")
    with pytest.raises(ValueError):
        MachineProfile(memory_mb=64)


def test_vfio_user_device_is_json() -> None:
    args = vfio_user_device_args(Path("/tmp/d.sock"))
    assert args[0] == "-device"
    spec = json.loads(args[1])
    assert spec == {
        "driver": "vfio-user-pci",
        "id": "net0",
        "socket": {"type": "unix", "path": "/tmp/d.sock"},
    }


def test_viommu_adds_iommu_and_guest_options() -> None:
    prof = MachineProfile(viommu=True)
    assert viommu_args(prof) == ["-device", "intel-iommu,caching-mode=on,intremap=on"]
    assert "intel_iommu=on iommu.strict=1" in kernel_cmdline(prof)
    # No boot-time timer check: under TCG it can miss ticks and panic with interrupt remapping.
    assert "no_timer_check" in kernel_cmdline(prof).split()
    assert viommu_args(MachineProfile()) == []


def test_the_tsc_watchdog_is_off_unless_the_user_says_otherwise() -> None:
    # The 7.x clocksource watchdog can deadlock a 2-vCPU TCG boot (harness.vm.qemu).
    assert "tsc=nowatchdog" in kernel_cmdline(MachineProfile()).split()
    mine = kernel_cmdline(MachineProfile(cmdline=("tsc=watchdog",))).split()
    assert "tsc=watchdog" in mine and "tsc=nowatchdog" not in mine


def test_full_args_orders_iommu_before_device() -> None:
    paths = MachinePaths(
        kernel=Path("k"),
        initrd=Path("i"),
        device_socket=Path("s"),
        qmp_socket=Path("q"),
        console_log=Path("c"),
    )
    args = full_args(["qemu"], MachineProfile(viommu=True, cmdline=("harness.bytes=1",)), paths)
    assert args[0] == "qemu"
    iommu = args.index("intel-iommu,caching-mode=on,intremap=on")
    device = next(i for i, a in enumerate(args) if "vfio-user-pci" in a)
    assert iommu < device
    assert args[args.index("-append") + 1].endswith("harness.bytes=1")


def test_interactive_machine_console_socket_second_qmp_hotplug_ports_and_reboot() -> None:
    paths = MachinePaths(kernel=Path("k"), initrd=Path("i"), device_socket=Path("s"),
                         qmp_socket=Path("q"), console_log=Path("c.log"),
                         console_socket=Path("c.sock"), user_qmp_socket=Path("u.sock"))
    args = full_args(["qemu"], MachineProfile(hotplug_ports=2, reboot=True), paths)
    chardev = args[args.index("-chardev") + 1]
    assert chardev == "socket,id=console,path=c.sock,server=on,wait=off,logfile=c.log"
    qmps = [args[i + 1] for i, a in enumerate(args) if a == "-qmp"]
    assert qmps == ["unix:q,server=on,wait=off", "unix:u.sock,server=on,wait=off"]
    ports = [a for a in args if a.startswith("pcie-root-port")]
    assert ports == ["pcie-root-port,id=hp0,chassis=1,slot=1",
                     "pcie-root-port,id=hp1,chassis=2,slot=2"]
    assert "-no-reboot" not in args
    assert "-no-reboot" in full_args(["qemu"], MachineProfile(), paths)


def test_agent_serial_port_comes_after_the_console() -> None:
    paths = MachinePaths(kernel=Path("k"), initrd=Path("i"), device_socket=Path("s"),
                         qmp_socket=Path("q"), console_log=Path("c.log"),
                         agent_socket=Path("run/agent.sock"))
    args = full_args(["qemu"], MachineProfile(), paths)
    serials = [args[i + 1] for i, a in enumerate(args) if a == "-serial"]
    assert serials == ["chardev:console", "chardev:agent"]  # ttyS0 console, ttyS1 agent
    chardevs = [args[i + 1] for i, a in enumerate(args) if a == "-chardev"]
    assert chardevs[1] == "socket,id=agent,path=run/agent.sock,server=on,wait=off"
    assert args.index("chardev:console") < args.index("chardev:agent")
    without = full_args(["qemu"], MachineProfile(), replace(paths, agent_socket=None))
    assert "chardev:agent" not in without and without.count("-serial") == 1


def test_builtin_net_replaces_vfio_user_with_qemus_virtio_net_on_a_tap_fd() -> None:
    from harness.vm.qemu import builtin_net_args

    dev = builtin_net_args(7, "52:54:00:12:34:56")
    assert dev[:2] == ["-netdev", "tap,id=n0,fd=7,vhost=off"]
    props = dev[3].split(",")
    assert props[:5] == ["virtio-net-pci", "netdev=n0", "id=net0", "disable-legacy=on",
                         "mac=52:54:00:12:34:56"]
    # No offloads unless asked, as our device; never the ones ours cannot offer.
    assert {"csum=off", "host_tso4=off", "guest_tso6=off", "gso=off", "host_ufo=off"} <= set(props)
    assert "iommu_platform=on" not in props
    on = builtin_net_args(7, "52:54:00:12:34:56", viommu=True, offloads=True)[3].split(",")
    assert {"csum=on", "guest_csum=on", "host_tso4=on", "guest_tso6=on", "gso=off",
            "iommu_platform=on"} <= set(on)
    paths = MachinePaths(kernel=Path("k"), initrd=Path("i"), device_socket=Path("s"),
                         qmp_socket=Path("q"), console_log=Path("c.log"))
    args = full_args(["qemu"], MachineProfile(viommu=True), paths, dev)
    assert "vfio-user-pci" not in " ".join(args) and dev[3] in args
    assert args.index("intel-iommu,caching-mode=on,intremap=on") < args.index(dev[3])
    assert full_args(["qemu"], MachineProfile(), paths) == full_args(
        ["qemu"], MachineProfile(), paths, None)
