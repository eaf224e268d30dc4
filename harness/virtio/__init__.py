"""virtio over PCI: transport, split virtqueue and the net device (pure logic over MapOps)."""

from harness.virtio.net import DEFAULT_FEATURES, OFFLOAD_FEATURES, VirtioNetDevice
from harness.virtio.pci import VirtioPciDevice
from harness.virtio.protocols import InterruptSink, PacketBackend, no_barrier
from harness.virtio.virtqueue import Chain, QueueStats, SplitVirtqueue

__all__ = [
    "DEFAULT_FEATURES",
    "OFFLOAD_FEATURES",
    "Chain",
    "InterruptSink",
    "PacketBackend",
    "QueueStats",
    "SplitVirtqueue",
    "VirtioNetDevice",
    "VirtioPciDevice",
    "no_barrier",
]
