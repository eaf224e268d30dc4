"""A TAP for QEMU's own virtio-net (the reference side of `harness bench net`), made in the
run's namespace and handed to QEMU as an open fd (`-netdev tap,fd=N`).

A TAP belongs to the namespace of the thread that attaches to it, so a short-lived thread
enters the run's namespace, creates and configures the TAP there (198.18.0.1/24 like our
server's) and opens it; QEMU itself stays in the root namespace and inherits the fd, and every
frame stays in the run's namespace. The TAP goes away with the namespace.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading

from harness.net import tap
from harness.net.netns import enter


def open_in_netns(netns_name: str, ifname: str, address: str, prefixlen: int = 24) -> int:
    """Create TAP `ifname` (vnet header, no packet info) in the namespace, give it `address`,
    bring it up, and return an fd attached to it (close-on-exec; pass it with pass_fds)."""
    result: dict[str, int] = {}
    failure: list[BaseException] = []

    def work() -> None:
        try:
            # setns(2) moves only this thread; it ends right after.
            enter(netns_name)
            tap.create(ifname)
            tap.configure(ifname, address, prefixlen)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                ifr = struct.pack("16sH", ifname.encode(),
                                  tap.IFF_TAP | tap.IFF_NO_PI | tap.IFF_VNET_HDR)
                fcntl.ioctl(fd, tap.TUNSETIFF, ifr)
            except OSError:
                os.close(fd)
                raise
            result["fd"] = fd
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=work, name=f"tap-{ifname}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result["fd"]
