"""What the virtio device needs from its host side: interrupts, packets, the C bursts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol


class InterruptSink(Protocol):
    """Raises MSI-X vector ``vector`` in the guest (harness.vfu: VfuContext.irq_trigger)."""

    def trigger(self, vector: int) -> None: ...


class PacketBackend(Protocol):
    """A frame source/sink speaking 12-byte virtio_net_hdr_v1 + Ethernet frame (a vnet TAP)."""

    def fileno(self) -> int: ...

    def readv(self, views: Sequence[memoryview]) -> int:
        """Read one frame scattered over ``views``; its length, or 0/-1 when none is ready."""
        ...

    def writev(self, views: Sequence[memoryview]) -> None:
        """Write one frame gathered from ``views``; OSError when it cannot be sent."""
        ...


class RegionRows(Protocol):
    """The C table of guest regions (harness.vfu.bursts.RegionTable), kept sorted by iova."""

    @property
    def c(self) -> Any: ...

    def __len__(self) -> int: ...

    def insert(self, iova: int, last: int, host: int, writable: bool) -> None: ...

    def remove(self, iova: int) -> bool: ...


class BurstEngine(Protocol):
    """The C TX/RX bursts (harness.vfu.bursts.CBursts), which harness.virtio.fastpath drives;
    cdata objects are opaque here."""

    def address(self, view: memoryview) -> int: ...

    def region_table(self) -> RegionRows: ...

    def queue(self, desc: int, avail: int, used: int) -> Any: ...

    def tx(self, q: Any, budget: int) -> int: ...

    def rx(self, q: Any, budget: int) -> int: ...


Barrier = Callable[[], None]


def no_barrier() -> None:
    """Default barrier for pure-Python tests; the device process passes harness.vfu's fence."""
