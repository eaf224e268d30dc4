"""harness.vm.stall: a stalled boot's vCPU state, from QEMU's own `info registers -a` text
(the sample below is from a real boot stopped at 1 s: CPU0 in the kernel, CPU1 still parked by
SeaBIOS in 32-bit mode)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from harness.guest.kernel import GuestKernel
from harness.guest.pvh import BootImage
from harness.testbed import Testbed, TestbedConfig
from harness.vm import stall

SAMPLE = """\
CPU#0
RAX=0000000000000001 RBX=ffffffff83203b06 RCX=0000000000000078 RDX=0000000000000007
RIP=ffffffff8121ec18 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]
CR0=80050033 CR2=ffff888004401000 CR3=000000000322a000 CR4=000100b0

CPU#1
EAX=000f426e EBX=00000000 ECX=000002ff EDX=00000001
EIP=000fd0a5 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1
CS =0008 00000000 ffffffff 00cf9b00 DPL=0 CS32 [-RA]
CR0=00000011 CR2=00000000 CR3=00000000 CR4=00000000
"""

REAL_MODE = """\
CPU#0
EAX=00000000 EBX=00000000 ECX=00000000 EDX=00000663
EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
CS =f000 ffff0000 0000ffff 00009b00
CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000
"""


def test_both_vcpus_are_read_whatever_their_mode() -> None:
    cpus = stall.parse_registers(SAMPLE)
    assert [(c.index, c.rip, c.halted, c.where()) for c in cpus] == [
        (0, 0xFFFFFFFF8121EC18, False, "kernel text"),
        (1, 0xFD0A5, True, "firmware")]


def test_real_mode_is_the_firmware_whatever_the_address() -> None:
    (cpu,) = stall.parse_registers(REAL_MODE)
    assert not cpu.protected and cpu.cs_base == 0xFFFF0000 and cpu.where() == "firmware"


def test_the_summary_tells_spinning_from_moving_from_halted() -> None:
    first = stall.parse_registers(SAMPLE)
    moved = stall.parse_registers(SAMPLE.replace("RIP=ffffffff8121ec18", "RIP=ffffffff81000000"))
    assert stall.summarize(first, first) == (
        "CPU0 kernel text RIP=0xffffffff8121ec18 (spinning at one address); "
        "CPU1 firmware RIP=0xfd0a5 (halted)")
    assert "CPU0 kernel text RIP=0xffffffff8121ec18 (running, moving)" in stall.summarize(
        first, moved)
    assert stall.summarize([], []) == "no vCPU state from QEMU"


def test_a_qemu_that_does_not_answer_is_said_so() -> None:
    def ask(command: str, arguments: dict[str, object]) -> object:
        raise TimeoutError("QMP timed out")

    summary, report = stall.diagnose(ask, pause=0)
    assert summary.startswith("QEMU did not answer QMP") and "no vCPU state" in summary
    assert "--- info registers -a ---" in report


@pytest.mark.parametrize("hlt", ["0", "1"])
def test_diagnose_asks_twice_and_keeps_everything(hlt: str) -> None:
    asked: list[str] = []

    def ask(command: str, arguments: dict[str, object]) -> object:
        asked.append(str(arguments.get("command-line", command)))
        if command == "query-status":
            return {"status": "running", "running": True}
        return SAMPLE.replace("HLT=0", f"HLT={hlt}")

    summary, report = stall.diagnose(ask, pause=0)
    assert asked == ["query-status", "info registers -a", "info registers -a", "info pci"]
    assert summary.startswith("CPU0 kernel text")
    assert ("halted" in summary.split(";")[0]) is (hlt == "1")
    assert "'status': 'running'" in report and report.count("CPU#1") == 3


MAP = """\
ffffffff81000000 T _text
ffffffff814948a0 t watchdog_check_skew
ffffffff81494990 t watchdog_check_skew_remote
ffffffff82000000 D some_data
ffffffff814e04c0 W stop_machine_yield
0000000000000000 A not_text
garbage line
"""


def test_a_system_map_names_kernel_text_only() -> None:
    symbols = stall.SymbolMap(MAP)
    assert len(symbols) == 4  # T, t, t, W: data and absolute symbols are not code
    assert symbols.name(0xFFFFFFFF81494928) == "watchdog_check_skew+0x88"
    assert symbols.name(0xFFFFFFFF814948A0) == "watchdog_check_skew+0x0"
    assert symbols.name(0xFFFFFFFF814E04C6) == "stop_machine_yield+0x6"  # sorted, not file order
    assert symbols.name(0xFFFFFFFF80000000) is None
    cpus = stall.parse_registers(SAMPLE.replace("RIP=ffffffff8121ec18", "RIP=ffffffff81494928"))
    assert stall.summarize(cpus, cpus, symbols) == (
        "CPU0 kernel text RIP=0xffffffff81494928 watchdog_check_skew+0x88 (spinning at one "
        "address); CPU1 firmware RIP=0xfd0a5 (halted)")


def test_debians_placeholder_map_is_no_map(tmp_path: Path) -> None:
    placeholder = tmp_path / "System.map"
    placeholder.write_text("ffffffffffffffff B The real System.map is in the "
                           "linux-image-7.3.4+deb13-amd64-dbg package\n")
    assert stall.SymbolMap.load(placeholder) is None
    assert stall.SymbolMap.load(tmp_path / "missing") is None
    assert stall.SymbolMap.load(None) is None
    placeholder.write_text(MAP)
    loaded = stall.SymbolMap.load(placeholder)
    assert loaded is not None and len(loaded) == 4


@pytest.mark.parametrize(("mode", "config", "append", "named"), [
    ("pvh", {"CONFIG_RANDOMIZE_BASE": "y"}, (), True),  # the PVH entry does not relocate
    ("bzimage", {"CONFIG_RANDOMIZE_BASE": "y"}, (), False),  # KASLR moved it: no names
    ("bzimage", {"CONFIG_RANDOMIZE_BASE": "y"}, ("nokaslr",), True),
    ("bzimage", {"CONFIG_VIRTIO_NET": "m"}, (), True),  # built without KASLR
    ("bzimage", {}, (), False),  # no config: assume KASLR
])
def test_addresses_are_named_only_where_the_kernel_was_not_relocated(
        tmp_path: Path, mode: str, config: dict[str, str], append: tuple[str, ...],
        named: bool) -> None:
    system_map = tmp_path / "System.map"
    system_map.write_text(MAP)
    tb = Testbed.__new__(Testbed)
    tb.cfg = TestbedConfig(append=append)
    tb.boot = BootImage(tmp_path / "k", mode, "test")
    tb.kernel = GuestKernel(image=tmp_path / "k", version="7.3.4", source="test", config=config,
                            system_map=system_map)
    assert (tb._symbols() is not None) is named


class _Machine:
    def ask(self, command: str, arguments: dict[str, object], timeout: float = 5.0) -> object:
        return {"status": "running"} if command == "query-status" else SAMPLE


class _Device:
    def __init__(self, resets: int) -> None:
        self.resets = resets
        self.spec = SimpleNamespace(name="net0")

    def stats(self) -> dict[str, object]:
        return {"device": {"resets": self.resets, "status": 0}}


@pytest.mark.parametrize("resets", [1, 3])
def test_the_diagnosis_says_whether_a_driver_probed_the_device(tmp_path: Path,
                                                                resets: int) -> None:
    tb = Testbed.__new__(Testbed)
    tb.cfg = TestbedConfig()
    tb.run_dir = tmp_path
    tb.boot = BootImage(tmp_path / "k", "pvh", "test")
    tb.kernel = GuestKernel(image=tmp_path / "k", version="7.3.4", source="test")
    tb._machine = cast(Any, _Machine())
    tb.devices = [cast(Any, _Device(resets))]
    line = tb.diagnose_stall()
    assert line.startswith("CPU0 kernel text RIP=0xffffffff8121ec18")
    assert f"device net0: {resets} resets" in line
    assert ("no driver has probed it" in line) is (resets == 1)
    assert "CPU#1" in (tmp_path / "boot-stall.txt").read_text()
