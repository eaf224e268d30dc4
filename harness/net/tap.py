"""A TAP device as the device's packet backend: vnet-header frames in and out, zero-copy.

The TAP is opened with IFF_VNET_HDR and a 12-byte header (TUNSETVNETHDRSZ), which is exactly
`virtio_net_hdr_v1`: a guest's header passes through unchanged on TX, and on RX the kernel's
header lands straight in the guest's buffer, so offloads need no translation.

With multiqueue (IFF_MULTI_QUEUE) the device keeps one ``Tap`` per queue pair on the same
device; the kernel spreads flows over the attached queues by their hash, and ``set_queue``
attaches and detaches a queue (TUNSETQUEUE) as the driver enables pairs, as QEMU does.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Sequence
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from harness.virtio import constants as C

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
VNET_HDR_LEN = 12

#: TUNSETOFFLOAD bits: what the kernel may hand us unsegmented / without checksum.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08


def offload_for(features: int) -> int:
    """TUNSETOFFLOAD bits for a driver that negotiated ``features``: the kernel may then hand
    us partial checksums (GUEST_CSUM) and TSO frames (GUEST_TSO4/6, which need GUEST_CSUM)
    only if the driver can take them (virtio 1.3 5.1.6.4.1)."""
    if not features >> C.NET_F_GUEST_CSUM & 1:
        return 0
    flags = TUN_F_CSUM
    if features >> C.NET_F_GUEST_TSO4 & 1:
        flags |= TUN_F_TSO4
    if features >> C.NET_F_GUEST_TSO6 & 1:
        flags |= TUN_F_TSO6
    return flags


def create(ifname: str, *, multi_queue: bool = False) -> None:
    """Create a TAP device (vnet header, no packet info) with pyroute2 in this namespace.

    It is persistent until `destroy`: the device exists before any fd attaches, so the host
    side can be configured first, and the counters survive the fd (they are read at exit).
    ``multi_queue``: the device takes several fds (one per queue pair), each a queue.
    """
    if multi_queue:
        _create_multi_queue(ifname)
        return
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=ifname, kind="tuntap", mode="tap", vnet_hdr=True, no_pi=True)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise FileExistsError(f"a link named {ifname} already exists here") from None
            raise


def _create_multi_queue(ifname: str) -> None:
    """``create`` for a multi-queue TAP, by the ioctls (pyroute2's tuntap request drops the
    multi_queue flag): TUNSETIFF with IFF_MULTI_QUEUE, then TUNSETPERSIST."""
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=ifname):
            raise FileExistsError(f"a link named {ifname} already exists here")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), flags))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def destroy(ifname: str) -> None:
    """Remove a TAP made by `create` (a missing one is fine: the namespace may be gone)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            ipr.link("del", index=idx[0])


class Tap:
    """An open fd on a TAP device in the calling process's network namespace."""

    def __init__(self, ifname: str, *, offload: int = 0, multi_queue: bool = False) -> None:
        self.ifname = ifname
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
        try:
            ifr = struct.pack("16sH", ifname.encode(), flags)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, offload)
        except OSError:
            os.close(self.fd)
            raise
        self.offload = offload
        self.attached = True
        self.read_errors = 0
        self.write_errors = 0

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: from now on the kernel hands us only these offloads."""
        if flags != self.offload:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
            self.offload = flags

    def set_queue(self, attached: bool) -> None:
        """TUNSETQUEUE: attach this fd's queue (the kernel may steer frames to it) or detach
        it (its queued frames are dropped by the kernel; it neither reads nor writes)."""
        if attached != self.attached:
            ifr = struct.pack("16sH", b"", IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE)
            fcntl.ioctl(self.fd, TUNSETQUEUE, ifr)
            self.attached = attached

    # PacketBackend -------------------------------------------------------------------

    def fileno(self) -> int:
        return self.fd

    def readv(self, views: Sequence[memoryview]) -> int:
        """Read one frame straight into `views`; -1 when none is waiting."""
        try:
            return os.readv(self.fd, views)
        except BlockingIOError:
            return -1
        except OSError as exc:
            self.rx_failed(exc.errno or 0)
            return -1

    def writev(self, views: Sequence[memoryview]) -> None:
        """Write one frame (header + data) from `views`; a refused frame is counted, not raised."""
        try:
            os.writev(self.fd, views)
        except OSError as exc:
            self.tx_failed(1, exc.errno or 0)

    def io_fd(self) -> int:
        """The fd the device may ``writev`` / ``readv`` frames on itself
        (harness.virtio.fastpath)."""
        return self.fd

    def tx_failed(self, count: int, err: int) -> None:
        """``count`` frames written to the TAP (by ``writev``, or by the device on ``io_fd``)
        were refused, the last with ``err``: counted, and logged unless it was EAGAIN (queue
        full) or EINVAL (a malformed header from the guest): both mean the frame is dropped,
        which is what a NIC does; the guest is not to be trusted."""
        self.write_errors += count
        if err not in (errno.EAGAIN, errno.EINVAL):
            log.warning("TAP write failed: %s", os.strerror(err))

    def rx_failed(self, err: int) -> None:
        """A read from the TAP (by ``readv``, or by the device on ``io_fd``) failed with
        ``err`` (not EAGAIN): counted and logged."""
        self.read_errors += 1
        log.warning("TAP read failed: %s", os.strerror(err))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def configure(ifname: str, address: str, prefixlen: int, mtu: int | None = None) -> None:
    """Give the TAP its host-side address (and MTU) and bring it up (in this namespace)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        if mtu is not None:
            ipr.link("set", index=idx, mtu=mtu)
        ipr.link("set", index=idx, state="up")


def link_stats(ifname: str, netns_name: str | None = None) -> dict[str, int]:
    """The kernel's counters for a link, optionally in another namespace."""
    kwargs: dict[str, Any] = {"netns": netns_name} if netns_name else {}
    with IPRoute(**kwargs) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise LookupError(f"no link named {ifname}")
        link = ipr.get_links(idx[0])[0]
        stats = link.get_attr("IFLA_STATS64") or link.get("stats64") or {}
        return {k: int(v) for k, v in dict(stats).items()}
