"""The guest-IOVA observer: overlap, unmatched unmaps, the DMA mask, and what it reports."""

from __future__ import annotations

from harness.dma.observer import GuestIovaObserver

P = 4096


def test_a_well_behaved_stream_is_clean() -> None:
    o = GuestIovaObserver()
    for i in range(8):
        o.mapped(0xFFFFF000 - i * P, P)
    o.mapped(0xFFF00000, 16 * P)  # a 64 KiB mapping aligned to 64 KiB
    for i in range(8):
        o.unmapped(0xFFFFF000 - i * P, P)
    r = o.report()
    assert r["violations_total"] == 0
    assert r["peak_live"] == 9 and r["live"] == 1
    assert r["lowest_iova"] == 0xFFF00000
    assert r["size_histogram"] == {"4096": 8, "65536": 1}
    assert (r["multi_page"], r["aligned_multi_page"]) == (1, 1)


def test_overlapping_live_mappings_are_named() -> None:
    o = GuestIovaObserver()
    o.mapped(0x10000, 2 * P)
    o.mapped(0x11000, P)  # inside the first
    o.mapped(0xF000, 2 * P)  # straddles its start
    o.mapped(0x12000, P)  # adjacent: fine
    assert o.violations_total == 2
    assert all(v.kind == "overlap" for v in o.violations)
    assert "overlaps live [0x10000, +0x2000)" in str(o.violations[0])


def test_unmaps_must_match_a_live_mapping_exactly() -> None:
    o = GuestIovaObserver()
    o.mapped(0x10000, 2 * P)
    o.unmapped(0x10000, P)  # wrong size
    o.unmapped(0x20000, P)  # nothing there
    o.unmapped(0x10000, 2 * P)  # right
    o.unmapped(0x10000, 2 * P)  # twice
    kinds = [v.kind for v in o.violations]
    assert kinds == ["unmatched_unmap"] * 3
    assert o.live == 0


def test_dma_mask_and_wrapping() -> None:
    o = GuestIovaObserver(dma_mask_bits=32)
    o.mapped(0xFFFFF000, 2 * P)
    o.mapped((1 << 64) - P, 2 * P)
    o.mapped(0x1000, 0)
    assert [v.kind for v in o.violations] == ["above_mask", "wraps", "zero_size"]


def test_unaligned_multi_page_is_visible() -> None:
    o = GuestIovaObserver()
    o.mapped(0x11000, 4 * P)  # 16 KiB not aligned to 16 KiB
    assert (o.busiest.multi_page, o.busiest.aligned_multi_page) == (1, 0)


def test_the_report_describes_the_busiest_epoch() -> None:
    o = GuestIovaObserver()
    o.mapped(0x0, 0xA0000)  # boot: RAM 1:1 before the guest turns DMA remapping on
    o.mapped(0x100000, 0x1FF00000)
    o.unmapped(0x0, 0xA0000)
    o.unmapped(0x100000, 0x1FF00000)
    for i in range(3):  # the guest's allocator, top-down from 4 GiB
        o.mapped(0xFFFFF000 - i * P, P)
    for i in range(3):
        o.unmapped(0xFFFFF000 - i * P, P)
    r = o.report()
    assert r["epochs"] == 3 and r["maps"] == 5
    assert r["lowest_iova"] == 0xFFFFD000 and r["size_histogram"] == {"4096": 3}
