"""Guest memory that arrives one page per DMA region, as it does behind a vIOMMU.

With intel-iommu and ACCESS_PLATFORM, every page the guest maps becomes its own DMA_MAP; a
buffer that crosses a page boundary then spans two regions. The device must map it in pieces
(as a device behind an IOMMU walks pages) instead of calling it a bad address: a real guest
found this on its first TCP transfer.
"""

from __future__ import annotations

import struct

from harness.testing.mockdriver import NetRig, net_rig
from harness.virtio import constants as C

PAGE = 4096


def paged_rig() -> NetRig:
    r = net_rig(init=False)
    mem = r.driver.mem
    whole = memoryview(mem.buf)
    mem.memory.remove_range(mem.base, mem.size)
    for off in range(0, mem.size, PAGE):
        mem.memory.add_region(mem.base + off, whole[off : off + PAGE], writable=True)
    # Linux allocates rings with dma_alloc_coherent, which is page-granular: each ring part
    # (descriptors, avail, used) then lies inside one page, i.e. one region.
    bump = mem.alloc
    mem.alloc = lambda size, align=16: bump(size, PAGE)  # type: ignore[method-assign]
    try:
        r.driver.init()
    finally:
        mem.alloc = bump  # type: ignore[method-assign]
    return r


def hdr() -> bytes:
    return bytes(C.NET_HDR_SIZE)


def test_regions_are_pages() -> None:
    r = paged_rig()
    assert len(r.driver.mem.memory) == r.driver.mem.size // PAGE


def test_tx_buffer_crossing_pages_arrives_intact() -> None:
    r = paged_rig()
    mem = r.driver.mem
    # Push the heap to 100 bytes before a page boundary, then post a 3000-byte frame.
    pad = (-(mem._next + 100)) % PAGE
    mem.alloc(pad, align=1)
    frame = bytes(range(256)) * 11 + b"tail"
    r.tx.add([hdr() + frame])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [hdr() + frame]
    assert not r.device.status & C.STATUS_NEEDS_RESET
    assert r.device.stats()["errors"] == 0


def test_rx_buffer_crossing_pages_receives_intact() -> None:
    r = paged_rig()
    mem = r.driver.mem
    pad = (-(mem._next + 700)) % PAGE
    mem.alloc(pad, align=1)
    for _ in range(4):
        r.rx.add(in_=[1526])
    r.rx.kick()
    r.device.process()
    frame = hdr() + bytes((i * 7) & 0xFF for i in range(1500))
    r.backend.rx.append(frame)
    r.device.on_backend_readable()
    (head, n), *_ = r.rx.get_used()
    got = r.rx.written(head, n)
    assert got[12:] == frame[12:]
    assert struct.unpack_from("<H", got, 10)[0] == 1  # num_buffers
    assert not r.device.status & C.STATUS_NEEDS_RESET
