"""The exceptions of guest-memory access; this module is their single home.

Tree::

    Exception
     +-- DmaFault          a DMA access the device must not perform (bad IOVA, length, direction)
    ValueError
     +-- RegionOverlap     GuestMemory.add_region over memory that is already registered
"""

from __future__ import annotations


class DmaFault(Exception):
    """A DMA access that cannot be performed.

    ``transient`` separates resource failures (an injected mapping error, an exhausted bounce
    pool: retrying later may succeed) from faults caused by what the guest supplied (an address
    outside its memory: the guest is wrong and retrying cannot help).
    """

    def __init__(self, iova: int, length: int, reason: str, *, transient: bool = False) -> None:
        super().__init__(f"DMA fault at iova {iova:#x} len {length:#x}: {reason}")
        self.iova = iova
        self.length = length
        self.reason = reason
        self.transient = transient


class RegionOverlap(ValueError):
    """A region was added over IOVAs already covered by another region."""

    def __init__(self, iova: int, size: int, other_iova: int, other_size: int) -> None:
        super().__init__(
            f"region [{iova:#x}, {iova + size:#x}) overlaps "
            f"[{other_iova:#x}, {other_iova + other_size:#x})"
        )
        self.iova = iova
        self.size = size
        self.other_iova = other_iova
        self.other_size = other_size
