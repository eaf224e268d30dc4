"""Plain data types that cross the libvfio-user boundary (no cffi needed to use them)."""

from __future__ import annotations

import enum
import mmap
from dataclasses import dataclass

#: DmaRegion.prot bits: libvfio-user reports the mmap protection it mapped the region with.
PROT_READ: int = mmap.PROT_READ
PROT_WRITE: int = mmap.PROT_WRITE


class ResetType(enum.IntEnum):
    """Why the reset callback runs (vfu_reset_type_t)."""

    DEVICE = 0
    LOST_CONN = 1
    PCI_FLR = 2


@dataclass(frozen=True)
class DmaRegion:
    """One region of guest memory the client mapped for the device.

    `view` covers exactly [iova, iova + size) of the mmapped guest memory (read-only unless
    prot has PROT_WRITE), or is None when the client sent no fd (ROM, VRAM windows): such a
    region is not accessible to the device. The view, and every slice or cast made from it,
    points into a mapping libvfio-user unmaps right after on_unmap returns: consumers must drop
    all of them in on_unmap, since touching one afterwards is a segfault, not an exception.
    """

    iova: int
    size: int
    prot: int
    view: memoryview | None

    @property
    def writable(self) -> bool:
        return bool(self.prot & PROT_WRITE)

    @property
    def end(self) -> int:
        return self.iova + self.size
