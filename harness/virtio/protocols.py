"""The two interfaces the virtio device needs from its host side: interrupts and packets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol


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


Barrier = Callable[[], None]


def no_barrier() -> None:
    """Default barrier for pure-Python tests; the device process passes harness.vfu's fence."""
