"""harness.vfu.mapcache against the real libvfio-user: one mapping per guest-RAM file.

A real client maps pages of one memfd as separate DMA regions, as QEMU does behind a vIOMMU;
each region's view must be exactly its own page of the file (shared both ways, read-only when
the map was), whether the cache serves it or the library maps it itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

try:
    import harness.vfu._vfu  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"harness.vfu._vfu is not built ({exc})", allow_module_level=True)

from harness.testing.vfu_client import VfioUserClient
from harness.vfu import Disconnected, VfuContext
from harness.vfu._vfu import ffi, lib
from harness.vfu.mapcachectl import MAP_CACHE_ENV, map_cache_on, map_cache_stats
from tests.unit import test_vfu
from tests.unit.test_vfu import Device

PAGE = 0x1000
IOVA = 0x4000_0000


@contextmanager
def guest_file(pages: int, size: int = 0) -> Iterator[tuple[int, dict[str, int]]]:
    """A memfd (``size`` bytes, else ``pages`` pages) whose page i is filled with the byte
    i + 1, so every page differs; and the cache's counters before any map of it."""
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, size or pages * PAGE)
        for i in range(pages):
            os.pwrite(fd, bytes([i + 1]) * PAGE, i * PAGE)
        yield fd, map_cache_stats()
    finally:
        os.close(fd)  # the library keeps its own copies


def address(view: memoryview) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(view)))


#: test_vfu's fixture: a real context served on this thread, with a real client attached.
served = test_vfu.served


@pytest.fixture(autouse=True)
def _cache_back_on() -> Iterator[None]:
    yield
    lib.harness_map_cache_enable(1)  # a test switched it off: the next one has it as usual


def delta(before: dict[str, int]) -> dict[str, int]:
    after = map_cache_stats()
    return {k: after[k] - before[k] for k in after}


def test_pages_of_one_file_share_one_mapping(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    ctx, dev, client = served
    with guest_file(8) as (fd, before):
        for i in (5, 0, 2):  # out of order, as a guest maps its buffers
            client.dma_map(IOVA + i * PAGE, PAGE, fd=fd, offset=i * PAGE)
    assert delta(before) == {"hits": 3, "fallbacks": 0, "files_mapped": 1, "files_released": 0}
    views = {r.iova: r.view for r in dev.maps}
    base = {iova: address(v) - (iova - IOVA) for iova, v in views.items() if v is not None}
    assert len(set(base.values())) == 1, "the three pages are not in one mapping"
    assert ctx.stats()["map_cache"] == map_cache_stats()


def test_each_view_is_its_own_page_shared_both_ways(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    _, dev, client = served
    with guest_file(8) as (fd, _):
        for i in (3, 6):
            client.dma_map(IOVA + i * PAGE, 2 * PAGE if i == 6 else PAGE, fd=fd, offset=i * PAGE)
        by_iova = {r.iova: r.view for r in dev.maps}
        three, six = by_iova[IOVA + 3 * PAGE], by_iova[IOVA + 6 * PAGE]
        assert three is not None and six is not None
        assert (len(three), len(six)) == (PAGE, 2 * PAGE)
        assert bytes(three) == bytes([4]) * PAGE
        assert bytes(six) == bytes([7]) * PAGE + bytes([8]) * PAGE
        three[10:14] = b"WXYZ"  # the device writes: the guest (the file) sees it
        assert os.pread(fd, 4, 3 * PAGE + 10) == b"WXYZ"
        os.pwrite(fd, b"guest", 7 * PAGE)  # the guest writes: the device sees it
        assert bytes(six[PAGE : PAGE + 5]) == b"guest"


def test_read_only_map_gives_read_only_view(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    _, dev, client = served
    with guest_file(2) as (fd, before):
        client.dma_map(IOVA, PAGE, fd=fd, offset=PAGE, writable=False)
        client.dma_map(IOVA + PAGE, PAGE, fd=fd, offset=0)
    assert delta(before)["hits"] == 2
    ro, rw = dev.maps
    assert ro.view is not None and ro.view.readonly and bytes(ro.view[:2]) == b"\x02\x02"
    assert rw.view is not None and not rw.view.readonly


def test_file_mapping_goes_with_its_last_region(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    _, dev, client = served
    with guest_file(4) as (fd, before):
        client.dma_map(IOVA, PAGE, fd=fd, offset=0)
        client.dma_map(IOVA + PAGE, PAGE, fd=fd, offset=PAGE)
        client.dma_unmap(IOVA, PAGE)
        assert delta(before)["files_released"] == 0  # one region still points into it
        client.dma_unmap(IOVA + PAGE, PAGE)
        assert delta(before)["files_released"] == 1
        # Mapped again from scratch, and a client that leaves releases it too.
        client.dma_map(IOVA, PAGE, fd=fd, offset=2 * PAGE)
    assert delta(before)["files_mapped"] == 2
    assert dev.maps[-1].view is not None and bytes(dev.maps[-1].view[:1]) == b"\x03"
    client.close()
    with pytest.raises(Disconnected):
        served[0].run()
    assert delta(before)["files_released"] == 2


def test_file_grown_past_its_mapping_falls_back_to_the_library(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    _, dev, client = served
    with guest_file(2) as (fd, before):
        client.dma_map(IOVA, PAGE, fd=fd, offset=0)
        os.ftruncate(fd, 4 * PAGE)
        os.pwrite(fd, b"\x09" * PAGE, 3 * PAGE)
        client.dma_map(IOVA + PAGE, PAGE, fd=fd, offset=3 * PAGE)
    assert delta(before) == {"hits": 1, "fallbacks": 1, "files_mapped": 1, "files_released": 0}
    assert dev.maps[-1].view is not None and bytes(dev.maps[-1].view) == b"\x09" * PAGE


def test_switched_off_the_library_maps_each_region(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    _, dev, client = served
    lib.harness_map_cache_enable(0)
    with guest_file(4) as (fd, before):
        client.dma_map(IOVA, PAGE, fd=fd, offset=PAGE)
        client.dma_map(IOVA + PAGE, PAGE, fd=fd, offset=2 * PAGE)
    assert delta(before) == {"hits": 0, "fallbacks": 0, "files_mapped": 0, "files_released": 0}
    assert [bytes(r.view[:1]) for r in dev.maps if r.view is not None] == [b"\x02", b"\x03"]


def test_switch_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAP_CACHE_ENV, raising=False)
    assert map_cache_on()
    monkeypatch.setenv(MAP_CACHE_ENV, "off")
    assert not map_cache_on()
    monkeypatch.setenv(MAP_CACHE_ENV, "no")
    with pytest.raises(ValueError, match="expected on or off"):
        map_cache_on()


def test_read_only_file_falls_back_to_the_library(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    _, dev, client = served
    with guest_file(2) as (fd, before):
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # the cache maps read-write: refused
        try:
            client.dma_map(IOVA, PAGE, fd=ro, offset=PAGE, writable=False)
        finally:
            os.close(ro)
    assert delta(before) == {"hits": 0, "fallbacks": 1, "files_mapped": 0, "files_released": 0}
    (region,) = dev.maps
    assert region.view is not None and region.view.readonly
    assert bytes(region.view[:2]) == b"\x02\x02"


def test_huge_file_is_mapped_region_by_region(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    """A client's sparse 2^40-byte file: mapping it whole would cost a TiB of our address
    space per file, so only the region is mapped."""
    _, dev, client = served
    with guest_file(0, size=1 << 40) as (fd, before):
        os.pwrite(fd, b"far", (1 << 40) - PAGE)
        client.dma_map(IOVA, PAGE, fd=fd, offset=(1 << 40) - PAGE)
    assert delta(before) == {"hits": 0, "fallbacks": 1, "files_mapped": 0, "files_released": 0}
    (region,) = dev.maps
    assert region.view is not None and bytes(region.view[:3]) == b"far"
