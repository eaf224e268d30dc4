"""The C bursts' per-queue state is handed only what changed (harness.virtio.fastpath): the
region rows and their count after every insert or removal, the RX settings after a
renegotiation. A burst must never run on rows from before a change: a region added since
is found by C, and a region removed since is not written by C (the Python path refuses the
buffer there instead)."""

from __future__ import annotations

import struct

from harness.testing.mockdriver import FdBackend, NetRig, net_rig
from harness.virtio import constants as C

P = 0x1000
NEW = 0x10000000  # new regions, far from the mock's own
HDR = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)


def _rig() -> NetRig:
    r = net_rig(ledger=True, backend=FdBackend(), bursts=True, queue_size=16)
    assert r.device.fastpath is not None
    return r


def _post_at(r: NetRig, addr: int) -> None:
    """One writable 1536-byte RX buffer at ``addr``, posted by hand (the mock driver's
    allocator only knows its own region)."""
    head = r.rx.free.pop(0)
    r.rx.write_desc(head, addr, 1536, C.DESC_F_WRITE, 0)
    r.rx.set_avail_slot(r.rx.avail_idx, head)
    r.rx.set_avail_idx(r.rx.avail_idx + 1)
    r.rx.kick()  # the device had run out of buffers
    r.device.process()


def _receive_one(r: NetRig) -> None:
    assert isinstance(r.device.backend, FdBackend)
    r.device.backend.deliver(HDR + r.device.mac + bytes(60))
    r.device.on_backend_readable()


def test_a_burst_finds_a_region_added_since_the_last_burst() -> None:
    r = _rig()
    fast = r.device.fastpath
    assert fast is not None
    r.rx.add(in_=[1536])
    r.rx.kick()
    r.device.process()
    _receive_one(r)
    assert fast.rx_frames == 1  # the state has been handed the rows once
    views = [memoryview(bytearray(P)) for _ in range(80)]  # the table grows: its rows move
    for k, v in enumerate(views):
        r.driver.mem.memory.add_region(NEW + k * P, v, writable=True)
    _post_at(r, NEW + 79 * P)
    _receive_one(r)
    assert fast.rx_frames == 2  # in C, in the newest row
    assert bytes(views[79][12:18]) == r.device.mac


def test_a_burst_does_not_write_a_region_removed_since_the_last_burst() -> None:
    r = _rig()
    fast = r.device.fastpath
    assert fast is not None
    backing = bytearray(P)  # outlives the view, which the removal releases
    r.driver.mem.memory.add_region(NEW, memoryview(backing), writable=True)
    r.rx.add(in_=[1536])
    r.rx.kick()
    r.device.process()
    _receive_one(r)
    assert fast.rx_frames == 1
    r.driver.mem.memory.remove_range(NEW, P)  # the last row: its bytes stay behind the count
    _post_at(r, NEW)
    _receive_one(r)
    assert fast.rx_frames == 1  # not in C; the Python path refused it
    assert bytes(backing) == bytes(P)
