"""A guest whose boot stalled: what its vCPUs were doing, in one line and in a file.

A boot that never reaches /init's KTAP header has stalled somewhere between the firmware and
/init, and with ``quiet`` its console says nothing. :func:`diagnose` asks QEMU (over QMP, with
a timeout: a QEMU blocked in a device callback does not answer) for the run state and every
vCPU's registers, twice a second apart, so the report tells a vCPU spinning in one place
from one halted waiting for an interrupt, and firmware (real mode, below 1 MiB) from the
kernel. The whole text goes to the run directory; the summary line goes into the error.
"""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: One vCPU's header line and the registers the summary uses, from HMP `info registers -a`.
_CPU = re.compile(r"^CPU#(\d+)", re.M)
_RIP = re.compile(r"\b[RE]IP=([0-9a-f]+)")  # EIP: a vCPU in 32-bit mode (firmware)
_HLT = re.compile(r"HLT=(\d)")
_CS = re.compile(r"^CS =\S+ ([0-9a-f]+)", re.M)
_CR0 = re.compile(r"CR0=([0-9a-f]+)")


class BootStalled(TimeoutError):
    """The guest never reached /init's KTAP header (harness.vm.ktap.HEADER): its boot stalled
    in the firmware or the kernel; the message says where the vCPUs were."""


@dataclass(frozen=True)
class Vcpu:
    index: int
    rip: int
    halted: bool
    #: Protected mode (CR0.PE): off means real mode, i.e. the firmware.
    protected: bool
    cs_base: int

    def where(self) -> str:
        """Firmware, or the kernel, from the address and mode."""
        linear = self.cs_base + self.rip
        if not self.protected or linear < 0x100000:
            return "firmware"
        if self.rip >= 0xFFFF_FFFF_8000_0000:
            return "kernel text"
        return "low memory"


def parse_registers(text: str) -> list[Vcpu]:
    """Every vCPU in HMP `info registers -a` output (missing fields: that vCPU is left out)."""
    cpus: list[Vcpu] = []
    starts = [(int(m.group(1)), m.start()) for m in _CPU.finditer(text)]
    for i, (index, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(text)
        block = text[start:end]
        rip, hlt, cs, cr0 = (_RIP.search(block), _HLT.search(block), _CS.search(block),
                             _CR0.search(block))
        if rip is None or hlt is None:
            continue
        cpus.append(Vcpu(index, int(rip.group(1), 16), hlt.group(1) == "1",
                         protected=cr0 is None or bool(int(cr0.group(1), 16) & 1),
                         cs_base=int(cs.group(1), 16) if cs else 0))
    return cpus


class SymbolMap:
    """Kernel text symbols from a System.map (``address type name`` lines), for naming where
    a vCPU stopped. Only right when the kernel was not relocated (no KASLR: the PVH entry, or
    ``nokaslr``, or a kernel without CONFIG_RANDOMIZE_BASE); the caller decides that."""

    def __init__(self, text: str) -> None:
        pairs = []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 3 and len(fields[1]) == 1 and fields[1] in "TtWw":
                try:
                    pairs.append((int(fields[0], 16), fields[2]))
                except ValueError:
                    continue
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

    def __len__(self) -> int:
        return len(self._addrs)

    @classmethod
    def load(cls, path: Path | None) -> SymbolMap | None:
        """The map in ``path``, or None when there is none worth having (Debian ships a
        one-line placeholder pointing at its -dbg package)."""
        if path is None:
            return None
        try:
            symbols = cls(path.read_text(errors="replace"))
        except OSError:
            return None
        return symbols if len(symbols) else None

    def name(self, addr: int) -> str | None:
        """``symbol+0xoff`` for an address in kernel text, None below the first symbol."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        return f"{self._names[i]}+{addr - self._addrs[i]:#x}"


def summarize(first: list[Vcpu], second: list[Vcpu], symbols: SymbolMap | None = None) -> str:
    """One phrase per vCPU: where it is, halted or running, and whether it moved in between."""
    if not first:
        return "no vCPU state from QEMU"
    later = {c.index: c for c in second}
    parts = []
    for c in first:
        c2 = later.get(c.index)
        state = "halted" if c.halted else "running"
        if c2 is not None and c2.rip == c.rip and not c.halted:
            state = "spinning at one address"
        elif c2 is not None and c2.rip != c.rip:
            state += ", moving"
        name = symbols.name(c.rip) if symbols and c.where() == "kernel text" else None
        at = f"RIP={c.rip:#x}" + (f" {name}" if name else "")
        parts.append(f"CPU{c.index} {c.where()} {at} ({state})")
    return "; ".join(parts)


Ask = Callable[[str, dict[str, object]], object]


def diagnose(ask: Ask, pause: float = 1.0,
             symbols: SymbolMap | None = None) -> tuple[str, str]:
    """(summary, full report) of a stalled guest; ``ask(command, arguments)`` runs one QMP
    command and raises on failure or timeout; ``symbols`` names kernel addresses."""
    sections: list[str] = []
    samples: list[list[Vcpu]] = []

    def hmp(line: str) -> str:
        try:
            out = ask("human-monitor-command", {"command-line": line})
        except Exception as exc:  # a diagnosis must not fail on QEMU's state
            out = f"(no answer: {exc!r})"
        text = out if isinstance(out, str) else repr(out)
        sections.append(f"--- {line} ---\n{text}")
        return text

    try:
        status = repr(ask("query-status", {}))
    except Exception as exc:
        status = f"(no answer: {exc!r})"
    sections.append(f"--- query-status ---\n{status}")
    samples.append(parse_registers(hmp("info registers -a")))
    time.sleep(pause)
    samples.append(parse_registers(hmp("info registers -a")))
    hmp("info pci")
    summary = summarize(samples[0], samples[1], symbols)
    if "no answer" in status:
        summary = f"QEMU did not answer QMP ({status}); {summary}"
    return summary, "\n\n".join(sections) + "\n"
