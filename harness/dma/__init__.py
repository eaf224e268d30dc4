"""Guest memory and DMA mapping for the device (pure logic, no I/O)."""

from harness.dma.errors import DmaFault, RegionOverlap
from harness.dma.mapops import Direction, DirectMapOps, DmaHandle, MapOps, failed_handle
from harness.dma.memory import GuestMemory

__all__ = [
    "DirectMapOps",
    "Direction",
    "DmaFault",
    "DmaHandle",
    "GuestMemory",
    "MapOps",
    "RegionOverlap",
    "failed_handle",
]
