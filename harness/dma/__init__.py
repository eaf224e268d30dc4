"""Guest memory and DMA mapping for the device (pure logic, no I/O)."""

from harness.dma.bounce import BounceMapOps
from harness.dma.errors import DmaFault, RegionOverlap
from harness.dma.factory import MAPOPS_KINDS, build_mapops
from harness.dma.faults import FaultInjectingMapOps, FaultSpec
from harness.dma.ledger import DmaLedger
from harness.dma.mapops import (
    ATTR_COHERENT,
    Direction,
    DirectMapOps,
    DmaHandle,
    MapCtx,
    MapOps,
    SgMapper,
    SgUnmapper,
    failed_handle,
    map_pieces,
    sg_mapper,
    sg_unmapper,
    unmap_pieces,
)
from harness.dma.memory import GuestMemory, GuestRegion

__all__ = [
    "ATTR_COHERENT",
    "MAPOPS_KINDS",
    "BounceMapOps",
    "DirectMapOps",
    "Direction",
    "DmaFault",
    "DmaHandle",
    "DmaLedger",
    "FaultInjectingMapOps",
    "FaultSpec",
    "GuestMemory",
    "GuestRegion",
    "MapCtx",
    "MapOps",
    "RegionOverlap",
    "SgMapper",
    "SgUnmapper",
    "build_mapops",
    "failed_handle",
    "map_pieces",
    "sg_mapper",
    "sg_unmapper",
    "unmap_pieces",
]
