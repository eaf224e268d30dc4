"""virtio-net's constants: the feature sets the device offers and accepts, queue indices,
frame and config-space sizes, and the used-ring batching switch (``HARNESS_BATCH_USED``).

Shared by the device (harness.virtio.net) and its RX path (harness.virtio.netrx); other code
imports them from harness.virtio.net, which re-exports the public ones.
"""

from __future__ import annotations

import struct

from harness import knobs
from harness.virtio import constants as C
from harness.virtio.pci import TRANSPORT_FEATURES

#: HARNESS_BATCH_USED=0 publishes used.idx (and decides an interrupt) after every frame instead
#: of once per TX flush / RX batch: the A/B's other side, to measure what batching buys.
BATCH_USED_ENV = "HARNESS_BATCH_USED"


def batch_used() -> bool:
    """True (the default, ``1``): one publish per batch; False for ``0``; ValueError for
    anything else, so a mistyped A/B side fails loudly."""
    return knobs.choice(BATCH_USED_ENV, ("0", "1"), "1") == "1"


#: HARNESS_TX_HOLDOFF_US=N (0: off): after a TX flush that drained at least TX_HOLDOFF_MIN
#: chains, leave the driver's kicks suppressed and look at the ring again N us later instead
#: (QEMU's tx=timer idea, for a stream only): fewer kicks (a vfio-user message each, sent by a
#: vCPU) and fewer server wake-ups while the guest streams; a lone request is never delayed.
TX_HOLDOFF_ENV = "HARNESS_TX_HOLDOFF_US"
#: "off" keeps every TX chain on the Python path (harness.virtio.fastpath; the A/B's other side).
FAST_TX_ENV = "HARNESS_FAST_TX"
#: The same for RX frames (harness.virtio.fastpath).
FAST_RX_ENV = "HARNESS_FAST_RX"
#: When the C RX burst publishes used.idx: "batch" (once, after the burst: the default) or
#: "frame" (after each frame's entries too, so a guest polling its ring sees frames as they
#: land; the interrupt decision stays once per burst). Round 13's A/B.
RX_PUBLISH_ENV = "HARNESS_RX_PUBLISH"
TX_HOLDOFF_MIN = 4


def tx_holdoff() -> float:
    """The hold-off in seconds (0.0: off, the default); ValueError for anything but an integer
    0..10000 (us), so a mistyped A/B side fails loudly."""
    return knobs.microseconds(TX_HOLDOFF_ENV, 0, 10000)


RX_QUEUE = 0
TX_QUEUE = 1
CTRL_QUEUE = 2  # with CTRL_VQ offered: after the queue pairs (5.1.2); 2 * max_pairs with MQ

DEFAULT_FEATURES = (
    (1 << C.F_VERSION_1)
    | (1 << C.NET_F_MAC)
    | (1 << C.NET_F_STATUS)
    | (1 << C.NET_F_MRG_RXBUF)
    | (1 << C.F_EVENT_IDX)
)
OFFLOAD_FEATURES = (
    (1 << C.NET_F_CSUM)
    | (1 << C.NET_F_GUEST_CSUM)
    | (1 << C.NET_F_HOST_TSO4)
    | (1 << C.NET_F_HOST_TSO6)
    | (1 << C.NET_F_GUEST_TSO4)
    | (1 << C.NET_F_GUEST_TSO6)
)
CTRL_FEATURES = (
    (1 << C.NET_F_CTRL_VQ)
    | (1 << C.NET_F_CTRL_RX)
    | (1 << C.NET_F_CTRL_RX_EXTRA)
    | (1 << C.NET_F_CTRL_MAC_ADDR)
)
SUPPORTED_FEATURES = (DEFAULT_FEATURES | OFFLOAD_FEATURES | TRANSPORT_FEATURES | CTRL_FEATURES
                      | (1 << C.NET_F_MTU))
#: Multiqueue: accepted on top of SUPPORTED_FEATURES (with ``max_pairs``), kept apart so the
#: default device's offer and its conformance checks stay exactly as they were.
MQ_FEATURES = 1 << C.NET_F_MQ
#: Per-queue reset and guest announcements: accepted on top too, offered only when switched on
#: (harness.virtio.features ring_reset, guest_announce), for the same reason.
RESET_ANNOUNCE_FEATURES = (1 << C.F_RING_RESET) | (1 << C.NET_F_GUEST_ANNOUNCE)
#: The packed ring format (harness.virtio.features ``packed``): accepted, offered when switched on.
PACKED_FEATURES = 1 << C.F_RING_PACKED

GUEST_GSO = (1 << C.NET_F_GUEST_TSO4) | (1 << C.NET_F_GUEST_TSO6) | (1 << C.NET_F_GUEST_UFO)
# Largest frame the backend may hand us: a 64 KiB GSO packet plus Ethernet+VLAN header, or a
# 1500-MTU frame with VLAN tag; plus the vnet header either way.
RX_MAX_GSO = C.NET_HDR_SIZE + 65535 + 18
RX_MAX_MTU = C.NET_HDR_SIZE + 1518
# No Ethernet frame is longer than a 64 KiB GSO packet plus its headers, offloads or not: a
# longer TX chain is completed, dropped and counted rather than handed to the backend.
TX_MAX = RX_MAX_GSO
#: The most buffers one readv/writev takes (Linux UIO_MAXIOV).
IOV_MAX = 1024
CONFIG_LEN = 8  # mac[6] + status: only what we implement (Linux BUG()s past the cap)
#: With VIRTIO_NET_F_MTU: ... + max_virtqueue_pairs (1: no MQ) + mtu (offset 10).
CONFIG_LEN_MTU = 12
#: With VIRTIO_NET_F_MQ but no MTU: mac, status, max_virtqueue_pairs.
CONFIG_LEN_MQ = 10
#: Queue pairs this device can have (one TAP fd each).
MAX_PAIRS = 4
U16 = struct.Struct("<H")
