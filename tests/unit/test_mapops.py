"""DirectMapOps: zero-copy views, Linux failure semantics, coherent attrs, registration."""

from __future__ import annotations

import pytest

from harness.dma import ATTR_COHERENT, Direction, DirectMapOps, GuestMemory, MapOps

P = 0x1000


def _mem() -> tuple[GuestMemory, bytearray]:
    b = bytearray(2 * P)
    mem = GuestMemory()
    mem.add_region(0x10000, memoryview(b), writable=True)
    mem.add_region(0x0, memoryview(bytearray(P)), writable=False)
    return mem, b


def test_direct_mapops_roundtrip() -> None:
    mem, b = _mem()
    ops: MapOps = DirectMapOps(mem, max_mapping_size=0x100)
    h = ops.map_page(0x10020, 8, Direction.FROM_DEVICE)
    assert not ops.mapping_error(h) and not ops.need_sync(h) and h.addr == 0x10020
    h.view[:] = b"12345678"
    ops.sync_single_for_cpu(h, Direction.FROM_DEVICE)
    ops.unmap_page(h, Direction.FROM_DEVICE)
    assert b[0x20:0x28] == b"12345678"
    with pytest.raises(ValueError):
        h.view[0]  # released on unmap: use-after-unmap is loud
    ops.unmap_page(h, Direction.FROM_DEVICE)  # a second unmap does nothing (the ledger counts it)
    assert ops.max_mapping_size() == 0x100


def test_to_device_view_is_read_only_and_registered() -> None:
    mem, b = _mem()
    ops = DirectMapOps(mem)
    b[0x30:0x34] = b"wxyz"
    h = ops.map_page(0x10030, 4, Direction.TO_DEVICE)
    assert bytes(h.view) == b"wxyz" and h.view.readonly
    region = mem.lookup(0x10030)
    assert region is not None and h in region.live
    ops.unmap_page(h, Direction.TO_DEVICE)
    assert not region.live


@pytest.mark.parametrize(
    ("iova", "size", "direction"),
    [
        (0x5000, 8, Direction.TO_DEVICE),  # outside memory
        (0x0, 8, Direction.FROM_DEVICE),  # read-only memory, device would write
        (0x0, 8, Direction.BIDIRECTIONAL),
        (0x10000, 0x101, Direction.TO_DEVICE),  # beyond max_mapping_size
        (0x11FF0, 0x20, Direction.TO_DEVICE),  # past the region's end
    ],
)
def test_direct_mapops_failure_only_via_mapping_error(
    iova: int, size: int, direction: Direction
) -> None:
    mem, _ = _mem()
    ops = DirectMapOps(mem, max_mapping_size=0x100)
    h = ops.map_page(iova, size, direction)  # never raises
    assert ops.mapping_error(h) and h.addr == -1
    assert h.error is not None and not h.error.transient


def test_coherent_mapping_is_not_bound_by_max_mapping_size() -> None:
    mem, _ = _mem()
    ops = DirectMapOps(mem, max_mapping_size=0x100)
    h = ops.map_page(0x10000, 0x1000, Direction.BIDIRECTIONAL, ATTR_COHERENT, ("rx0", -1, -1))
    assert not ops.mapping_error(h) and h.ctx == ("rx0", -1, -1)
    ops.unmap_page(h, Direction.BIDIRECTIONAL)


def test_alloc_is_device_private() -> None:
    ops = DirectMapOps(GuestMemory())
    h = ops.alloc(64)
    assert len(h.view) == 64 and h.addr == -1
    ops.free(h)
