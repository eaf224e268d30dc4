"""BounceMapOps: copies at the sync points, a second IOVA domain, transient exhaustion."""

from __future__ import annotations

import mmap

from harness.dma import ATTR_COHERENT, BounceMapOps, Direction, GuestMemory
from harness.dma.iova_faults import FailureInjector

P = 0x1000
BASE = 0x40000000


def _setup(window: int = 64 * P) -> tuple[GuestMemory, bytearray, BounceMapOps]:
    buf = bytearray(16 * P)
    mem = GuestMemory()
    mem.add_region(BASE, memoryview(buf), writable=True)
    mem.add_region(BASE + 0x100000, memoryview(bytearray(P)), writable=False)
    return mem, buf, BounceMapOps(mem, window=window)


def test_to_device_copied_at_map_and_at_sync_for_device() -> None:
    _, buf, ops = _setup()
    buf[0x10:0x18] = b"original"
    h = ops.map_page(BASE + 0x10, 8, Direction.TO_DEVICE)
    assert not ops.mapping_error(h) and ops.need_sync(h)
    assert h.addr != BASE + 0x10 and 0 < h.addr < 64 * P  # a bounce IOVA, not the guest's
    assert bytes(h.view) == b"original" and h.view.readonly
    buf[0x10:0x18] = b"rewrite!"
    assert bytes(h.view) == b"original"  # the device sees nothing until the sync
    ops.sync_single_for_device(h, Direction.TO_DEVICE)
    assert bytes(h.view) == b"rewrite!"
    ops.unmap_page(h, Direction.TO_DEVICE)
    assert buf[0x10:0x18] == b"rewrite!"


def test_from_device_copied_at_sync_for_cpu_and_unmap() -> None:
    _, buf, ops = _setup()
    buf[0x100:0x110] = b"G" * 16
    h = ops.map_page(BASE + 0x100, 16, Direction.FROM_DEVICE)
    # Pre-filled from the guest: a partial device write must not leak stale pool bytes.
    assert bytes(h.view) == b"G" * 16
    h.view[:4] = b"dev1"
    assert buf[0x100:0x104] == b"GGGG"  # the guest sees nothing yet
    ops.sync_single_for_cpu(h, Direction.FROM_DEVICE)
    assert buf[0x100:0x110] == b"dev1" + b"G" * 12
    h.view[4:8] = b"dev2"
    ops.unmap_page(h, Direction.FROM_DEVICE)
    assert buf[0x100:0x110] == b"dev1dev2" + b"G" * 8


def test_bidirectional_both_ways() -> None:
    _, buf, ops = _setup()
    h = ops.map_page(BASE + 3 * P, 2 * P, Direction.BIDIRECTIONAL)
    buf[3 * P : 3 * P + 4] = b"cpu!"
    ops.sync_single_for_device(h, Direction.BIDIRECTIONAL)
    assert bytes(h.view[:4]) == b"cpu!"
    h.view[-4:] = b"dev!"
    ops.sync_single_for_cpu(h, Direction.BIDIRECTIONAL)
    assert buf[5 * P - 4 : 5 * P] == b"dev!"
    ops.unmap_page(h, Direction.BIDIRECTIONAL)


def test_coherent_rings_are_not_bounced() -> None:
    _, buf, ops = _setup()
    h = ops.map_page(BASE, 3 * P, Direction.BIDIRECTIONAL, ATTR_COHERENT)
    assert not ops.mapping_error(h) and not ops.need_sync(h)
    assert h.addr == BASE and not h.bounced
    h.view[:2] = b"\x01\x02"
    assert buf[:2] == b"\x01\x02"  # straight into guest memory
    assert ops.domain.allocated_pfns == 0
    ops.unmap_page(h, Direction.BIDIRECTIONAL)


def test_iovas_come_from_the_bounce_domain_and_are_freed() -> None:
    _, _, ops = _setup()
    hs = [ops.map_page(BASE + i * P, P, Direction.FROM_DEVICE) for i in range(8)]
    addrs = {h.addr for h in hs}
    assert len(addrs) == 8 and all(a % P == 0 for a in addrs)
    for h in hs:
        entry = ops.domain.find_iova(h.addr // P)
        assert entry is not None and entry.pfn_lo == h.addr // P
    assert ops.live_slots == 8
    for h in hs:
        ops.unmap_page(h, Direction.FROM_DEVICE)
    assert ops.live_slots == 0
    ops.domain.flush_rcaches()  # freed ranges parked in the range caches go back to the tree
    assert ops.domain.allocated_pfns == 0
    ops.domain.check()


def test_size_aligned_multi_page_slots() -> None:
    _, _, ops = _setup()
    h = ops.map_page(BASE + 0x10, 3 * P, Direction.TO_DEVICE)  # spans 4 pages
    assert h.addr % P == 0x10  # the in-page offset is kept
    assert (h.addr - 0x10) % (4 * P) == 0 and len(h.view) == 3 * P
    ops.unmap_page(h, Direction.TO_DEVICE)


def test_exhausted_window_is_a_transient_mapping_error() -> None:
    _, _, ops = _setup(window=8 * P)  # pages 1..7 usable
    hs = [ops.map_page(BASE + i * P, P, Direction.TO_DEVICE) for i in range(7)]
    assert not any(ops.mapping_error(h) for h in hs)
    h = ops.map_page(BASE, P, Direction.TO_DEVICE)
    assert ops.mapping_error(h) and h.error is not None and h.error.transient
    assert ops.alloc_failures == 1
    ops.unmap_page(hs[0], Direction.TO_DEVICE)
    h = ops.map_page(BASE, P, Direction.TO_DEVICE)  # the retry succeeds
    assert not ops.mapping_error(h)


def test_node_alloc_failure_is_transient_and_deferred_erases_complete() -> None:
    mem, _, _ = _setup()
    inj = FailureInjector()
    ops = BounceMapOps(mem, window=64 * P, node_alloc=inj)
    inj.fail_next(2, "insert")  # alloc_iova_fast flushes the caches and retries once
    h = ops.map_page(BASE, P, Direction.TO_DEVICE)
    assert ops.mapping_error(h) and h.error is not None and h.error.transient
    big = ops.map_page(BASE, 8 * P, Direction.FROM_DEVICE)  # 8 pages
    assert not ops.mapping_error(big)
    ops.domain.flush_rcaches()
    inj.fail_next(1, "erase")
    # Put a range straight back into the tree (uncacheable once the caches are flushed).
    ops.unmap_page(big, Direction.FROM_DEVICE)
    ops.domain.flush_rcaches()
    assert ops.domain.deferred, "the erase should have been deferred"
    assert ops.housekeeping() == 1 and not ops.domain.deferred
    assert ops.domain.allocated_pfns == 0


def test_revoked_bounce_mapping_never_touches_the_guest() -> None:
    mm = mmap.mmap(-1, 4 * P)
    mem = GuestMemory()
    mem.add_region(BASE, memoryview(mm), writable=True)
    ops = BounceMapOps(mem, window=16 * P)
    h = ops.map_page(BASE + 0x20, 32, Direction.FROM_DEVICE)
    mem.remove_range(BASE, 4 * P)
    assert h.revoked
    mm.close()  # nothing references guest memory any more
    h.view[:4] = b"late"  # the device's bounce slot is still ours: harmless
    ops.sync_single_for_cpu(h, Direction.FROM_DEVICE)  # skipped, no crash
    ops.unmap_page(h, Direction.FROM_DEVICE)
    assert ops.live_slots == 0


def test_alloc_free_coherent() -> None:
    _, _, ops = _setup()
    h = ops.alloc(100)
    assert not ops.mapping_error(h) and h.addr > 0 and bytes(h.view) == bytes(100)
    ops.free(h)
    assert ops.domain.allocated_pfns == 0
    ops.close()
