"""MSI-X layout: where the table and PBA go, the capability's bytes, the BAR room they take.

Pure computation for VfuContext.setup_msix (harness.vfu.context_setup), which hands the results to
libvfio-user: the IRQ count, the capability, a zero-filled region for a BAR that has none.
QEMU emulates the table itself but sizes it from the capability and checks it against
GET_IRQ_INFO, so the count and the capability must agree.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from harness.vfu._vfu import lib

#: MSI-X table entries and PBA bits, in bytes (PCI spec; the table is QEMU's to emulate).
MSIX_ENTRY_SIZE = 16
#: Offset of the PBA when it shares the table's BAR and none is given (QEMU's own layout).
MSIX_DEFAULT_PBA_ALIGN = 0x800


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class MsixLayout(NamedTuple):
    """A checked placement of nr_vectors' table and PBA (msix_layout()); offsets in bytes."""

    nr_vectors: int
    table_bar: int
    table_offset: int
    table_size: int
    pba_bar: int
    pba_offset: int
    pba_size: int

    def capability(self) -> bytes:
        """The MSI-X capability structure, as add_capability() takes it."""
        cap = struct.pack(
            "<BBHII",
            lib.PCI_CAP_ID_MSIX,
            0,  # next pointer: libvfio-user links the list
            self.nr_vectors - 1,  # Table Size is encoded as N-1
            self.table_offset | self.table_bar,  # low 3 bits: BIR
            self.pba_offset | self.pba_bar,
        )
        assert len(cap) == lib.PCI_CAP_MSIX_SIZEOF
        return cap

    def bar_ends(self) -> dict[int, int]:
        """BAR index -> the end of what the table and the PBA take of it."""
        bar_sizes: dict[int, int] = {}
        for bar, end in ((self.table_bar, self.table_offset + self.table_size),
                         (self.pba_bar, self.pba_offset + self.pba_size)):
            bar_sizes[bar] = max(bar_sizes.get(bar, 0), end)
        return bar_sizes


def msix_layout(
    nr_vectors: int,
    table_bar: int,
    pba_bar: int,
    *,
    table_offset: int = 0,
    pba_offset: int | None = None,
) -> MsixLayout:
    """Place nr_vectors' table and PBA; ValueError for a count or placement QEMU would refuse.

    The PBA defaults to 0x800 after the table when both share a BAR (QEMU's layout), else to
    the start of its BAR.
    """
    if not 1 <= nr_vectors <= lib.PCI_MSIX_FLAGS_QSIZE + 1:
        raise ValueError(f"MSI-X vector count {nr_vectors} out of range")
    table_size = nr_vectors * MSIX_ENTRY_SIZE
    pba_size = _align_up(nr_vectors, 64) // 8
    if pba_offset is None:
        pba_offset = (
            _align_up(table_offset + table_size, MSIX_DEFAULT_PBA_ALIGN)
            if pba_bar == table_bar
            else 0
        )
    for name, off in (("table", table_offset), ("PBA", pba_offset)):
        if off % 8:
            raise ValueError(f"MSI-X {name} offset {off:#x} is not 8-byte aligned")
    if (
        pba_bar == table_bar
        and pba_offset < table_offset + table_size
        and (table_offset < pba_offset + pba_size)
    ):
        raise ValueError("MSI-X table and PBA overlap")
    return MsixLayout(nr_vectors, table_bar, table_offset, table_size,
                      pba_bar, pba_offset, pba_size)


def bar_size(end: int) -> int:
    """The size of a BAR made for the table or PBA to end at ``end``: a power of two >= 4 KiB."""
    size = 4096
    while size < end:
        size *= 2
    return size
