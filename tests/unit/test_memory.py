"""GuestMemory and DirectMapOps: lookup, overlap, range removal, map failures."""

from __future__ import annotations

import pytest

from harness.dma import Direction, DirectMapOps, DmaFault, GuestMemory, MapOps, RegionOverlap


def _mem() -> tuple[GuestMemory, bytearray, bytearray]:
    a, b = bytearray(0x1000), bytearray(0x2000)
    mem = GuestMemory()
    mem.add_region(0x10000, memoryview(b), writable=True)
    mem.add_region(0x0, memoryview(a), writable=False)
    return mem, a, b


def test_view_is_zero_copy_and_sorted() -> None:
    mem, a, b = _mem()
    assert mem.regions() == [(0x0, 0x1000, False), (0x10000, 0x2000, True)]
    v = mem.view(0x10010, 4, write=True)
    v[:] = b"abcd"
    assert b[0x10:0x14] == b"abcd"
    a[5] = 7
    assert mem.view(5, 1, write=False)[0] == 7


@pytest.mark.parametrize(
    ("iova", "length", "write"),
    [
        (0x1000, 1, False),  # gap after the first region
        (0xFFF, 2, False),  # straddles the end of a region
        (0x11FFF, 2, True),
        (0x12000, 1, True),  # past the last region
        (0x0, 1, True),  # read-only region written
        (0x10000, -1, False),
    ],
)
def test_view_faults(iova: int, length: int, write: bool) -> None:
    mem, _, _ = _mem()
    with pytest.raises(DmaFault) as e:
        mem.view(iova, length, write=write)
    assert e.value.iova == iova and not e.value.transient


def test_adjacent_regions_do_not_merge() -> None:
    mem = GuestMemory()
    mem.add_region(0, memoryview(bytearray(16)), writable=True)
    mem.add_region(16, memoryview(bytearray(16)), writable=True)
    with pytest.raises(DmaFault):
        mem.view(8, 16, write=False)


@pytest.mark.parametrize(("iova", "size"), [(0x0, 0x10), (0xFF0, 0x20), (0xFFFF, 2), (0x11FFF, 8)])
def test_overlapping_add_raises(iova: int, size: int) -> None:
    mem, _, _ = _mem()
    with pytest.raises(RegionOverlap):
        mem.add_region(iova, memoryview(bytearray(size)), writable=True)
    assert len(mem) == 2


def test_remove_range_removes_only_regions_fully_inside() -> None:
    mem = GuestMemory()
    for i in range(8):
        mem.add_region(i * 0x1000, memoryview(bytearray(0x1000)), writable=True)
    # [0x1800, 0x5000) holds pages 2, 3 and 4 fully; page 1 straddles the start.
    assert mem.remove_range(0x1800, 0x3800) == [
        (0x2000, 0x1000),
        (0x3000, 0x1000),
        (0x4000, 0x1000),
    ]
    assert [r[0] for r in mem.regions()] == [0x0, 0x1000, 0x5000, 0x6000, 0x7000]
    assert mem.remove_range(0x100000, 0x1000) == []
    assert mem.remove_range(0, 1 << 64) == [(i * 0x1000, 0x1000) for i in (0, 1, 5, 6, 7)]
    assert len(mem) == 0
    mem.add_region(0x2000, memoryview(bytearray(0x1000)), writable=True)  # space is free again


def test_direct_mapops_roundtrip() -> None:
    mem, _, b = _mem()
    ops: MapOps = DirectMapOps(mem, max_mapping_size=0x100)
    h = ops.map_page(0x10020, 8, Direction.FROM_DEVICE)
    assert not ops.mapping_error(h) and not ops.need_sync(h)
    h.view[:] = b"12345678"
    ops.sync_single_for_cpu(h, Direction.FROM_DEVICE)
    ops.unmap_page(h, Direction.FROM_DEVICE)
    assert b[0x20:0x28] == b"12345678"
    with pytest.raises(ValueError):
        h.view[0]  # released on unmap: use-after-unmap is loud
    assert ops.max_mapping_size() == 0x100


@pytest.mark.parametrize(
    ("iova", "size", "direction"),
    [
        (0x5000, 8, Direction.TO_DEVICE),  # outside memory
        (0x0, 8, Direction.FROM_DEVICE),  # read-only memory, device would write
        (0x0, 8, Direction.BIDIRECTIONAL),
        (0x10000, 0x101, Direction.TO_DEVICE),  # beyond max_mapping_size
    ],
)
def test_direct_mapops_failure_only_via_mapping_error(
    iova: int, size: int, direction: Direction
) -> None:
    mem, _, _ = _mem()
    ops = DirectMapOps(mem, max_mapping_size=0x100)
    h = ops.map_page(iova, size, direction)  # never raises
    assert ops.mapping_error(h)
    assert h.error is not None and not h.error.transient


def test_alloc_is_device_private() -> None:
    ops = DirectMapOps(GuestMemory())
    h = ops.alloc(64)
    assert len(h.view) == 64 and h.addr == -1
    ops.free(h)
