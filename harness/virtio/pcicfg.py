"""PciCfgWindow: the VIRTIO_PCI_CAP_PCI_CFG capability and its pci_cfg_data window (virtio 1.3
4.1.4.9).

struct virtio_pci_cfg_cap is a virtio_pci_cap (cfg_type 5) plus ``u8 pci_cfg_data[4]``. The
driver writes cap.bar, cap.offset and cap.length (1, 2 or 4) in config space; a write to
pci_cfg_data then performs a BAR write of cap.length bytes at cap.offset, a read of it a BAR
read whose bytes land in pci_cfg_data. Both go through the BAR's own handlers, so every check
of a direct access applies (ISR read-to-clear included).

The spec leaves a window that points nowhere to the driver (4.1.4.9.2: aligned, inside another
virtio structure); the device refuses it: an unknown BAR, a length other than 1/2/4, an offset
not a multiple of the length or past the end of the BAR: the access is not made (a read gives
zeros), counted in ``refused`` and logged. Length 0 is the power-on value, the window closed:
a read then gives zeros without counting (QEMU reads all of config space when it starts).
Writes to the read-only bytes of the cap (header, cfg_type, id, padding) are dropped and
counted. Nothing here raises on guest input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import NamedTuple

log = logging.getLogger(__name__)

#: Byte offsets inside struct virtio_pci_cfg_cap.
BAR = 4
OFFSET = 8
LENGTH = 12
DATA = 16
CAP_LEN = 20
#: The bytes the driver may write (4.1.4.9: cap.bar, cap.offset, cap.length, pci_cfg_data).
WRITABLE = frozenset({BAR, *range(OFFSET, CAP_LEN)})
#: Refusals logged one by one before the log thins out to every 1000th.
LOG_FIRST = 20


class Bar(NamedTuple):
    """One BAR the window can reach: its access handlers and size."""

    read: Callable[[int, int], bytes]
    write: Callable[[int, memoryview], None]
    size: int


class PciCfgWindow:
    """The capability's bytes and the window behind pci_cfg_data."""

    def __init__(self, cap: bytes, bars: Mapping[int, Bar]) -> None:
        if len(cap) != CAP_LEN or cap[2] != CAP_LEN:
            raise ValueError(f"a virtio_pci_cfg_cap is {CAP_LEN} bytes, got {len(cap)}")
        self.cap = bytes(cap)
        self.bars = dict(bars)
        self.regs = bytearray(cap)
        self.reads = 0  # BAR reads made through the window
        self.writes = 0  # BAR writes made through the window
        self.refused = 0  # window accesses not made, and writes to read-only cap bytes

    def reset(self) -> None:
        """Back to the power-on bytes (a new client, a PCI reset); not on a virtio reset, which
        a driver may well have written through this very window."""
        self.regs[:] = self.cap

    def stats(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes, "refused": self.refused}

    def _field(self, off: int, n: int) -> int:
        return int.from_bytes(self.regs[off : off + n], "little")

    def _refuse(self, why: str) -> None:
        self.refused += 1
        n = self.refused
        # A hostile driver can loop on this: the counter has every one, the log a few.
        if n <= LOG_FIRST or n % 1000 == 0:
            log.warning("pci_cfg window: %s (%d refused so far)", why, n)

    def _target(self, what: str) -> tuple[Bar, int, int] | None:
        """(bar, offset, length) of a valid window, else None (counted)."""
        bar, off, length = self.regs[BAR], self._field(OFFSET, 4), self._field(LENGTH, 4)
        where = f"{what} bar {bar} offset {off:#x} length {length}"
        b = self.bars.get(bar)
        if length not in (1, 2, 4):
            self._refuse(f"{where}: length not 1, 2 or 4")
        elif b is None:
            self._refuse(f"{where}: no such BAR")
        elif off % length:
            self._refuse(f"{where}: offset not aligned to the length")
        elif off + length > b.size:
            self._refuse(f"{where}: past the end of the BAR ({b.size:#x})")
        else:
            return b, off, length
        return None

    # ---- config-space accesses inside the cap (offsets relative to the cap) -----------------

    def read(self, off: int, count: int) -> bytes:
        """A config read of ``count`` bytes at ``off`` in the cap; touching pci_cfg_data makes
        the BAR read first. Bytes outside the cap read as zeros."""
        if off < CAP_LEN and off + count > DATA:
            self._window_read()
        return bytes(self.regs[max(off, 0) : off + count]).ljust(count, b"\0")

    def write(self, off: int, data: memoryview) -> None:
        """A config write at ``off`` in the cap: writable bytes stored, then a write touching
        pci_cfg_data makes the BAR write."""
        dropped = False
        for i, byte in enumerate(bytes(data)):
            pos = off + i
            if pos in WRITABLE:
                self.regs[pos] = byte
            elif not 0 <= pos < CAP_LEN or self.regs[pos] != byte:
                dropped = True
        if dropped:
            self._refuse(f"write of {len(data)} bytes at cap+{off} to read-only bytes")
        if off < CAP_LEN and off + len(data) > DATA:
            self._window_write()

    def _window_read(self) -> None:
        if self._field(LENGTH, 4) == 0:  # closed: nothing to do, nothing wrong
            self.regs[DATA:CAP_LEN] = bytes(4)
            return
        t = self._target("read")
        if t is None:
            self.regs[DATA:CAP_LEN] = bytes(4)
            return
        bar, off, length = t
        data = bar.read(off, length)
        self.reads += 1
        # The first cap.length bytes are the BAR's (4.1.4.9.1); the rest reads as zeros.
        self.regs[DATA:CAP_LEN] = bytes(data[:length]).ljust(4, b"\0")

    def _window_write(self) -> None:
        t = self._target("write")
        if t is None:
            return
        bar, off, length = t
        self.writes += 1
        bar.write(off, memoryview(bytes(self.regs[DATA : DATA + length])))
