"""DmaLedger: every violation kind is caught, counted and (if guest-caused) fatal to the map."""

from __future__ import annotations

import logging

import pytest

from harness.dma import (
    ATTR_COHERENT,
    Direction,
    DirectMapOps,
    DmaLedger,
    GuestMemory,
    build_mapops,
)
from harness.testing.mockdriver import FakeBackend, FakeIrq, MockDriver, MockMemory
from harness.virtio import constants as C
from harness.virtio.net import VirtioNetDevice

#: Every test here runs on both region indexes (conftest.index_kind).
pytestmark = pytest.mark.usefixtures("index_kind")

P = 0x1000
RW = 0x100000
RO = 0x200000


def _ledger(kind: str = "direct") -> tuple[DmaLedger, GuestMemory, list[bool]]:
    mem = GuestMemory()
    mem.add_region(RW, memoryview(bytearray(4 * P)), writable=True)
    mem.add_region(RO, memoryview(bytearray(P)), writable=False)
    bme = [True]
    _ops, ledger = build_mapops(kind, mem, bus_master=lambda: bme[0])
    assert ledger is not None
    return ledger, mem, bme


@pytest.mark.parametrize("kind", ["direct", "bounce"])
def test_clean_traffic_counts(kind: str) -> None:
    led, _, _ = _ledger(kind)
    hs = [led.map_page(RW + i * 64, 64, Direction.FROM_DEVICE, 0, ("rx0", i, 2)) for i in range(5)]
    ring = led.map_page(RW + 3 * P, P, Direction.BIDIRECTIONAL, ATTR_COHERENT, ("rx0", -1, -1))
    assert led.live == 6 and led.peak_live == 6
    for h in hs:
        led.sync_single_for_cpu(h, Direction.FROM_DEVICE)
        led.unmap_page(h, Direction.FROM_DEVICE)
    led.unmap_page(ring, Direction.BIDIRECTIONAL)
    s = led.stats()
    assert s["maps"] == 6 and s["unmaps"] == 6 and s["coherent_maps"] == 1
    assert s["live"] == 0 and s["peak_live"] == 6 and s["violations_total"] == 0
    assert s["map_bytes"] == 5 * 64 + P and s["syncs_for_cpu"] == 5
    assert s["mapops"]["mode"] == kind  # type: ignore[index]
    space = s["iova_space"]
    assert isinstance(space, dict) and space["regions"] == 2 and space["mapped_bytes"] == 5 * P
    assert led.check_leaks("reset") == 0


@pytest.mark.parametrize(
    ("iova", "size", "direction", "ctx", "kind", "transient"),
    [
        (0x5000, 8, Direction.TO_DEVICE, ("tx0", 3, 0), "unmapped_iova", False),
        (RW + 4 * P - 8, 16, Direction.TO_DEVICE, ("tx0", 3, 0), "out_of_bounds", False),
        (RO, 8, Direction.FROM_DEVICE, ("rx0", 1, 2), "read_only_region", False),
        (RO, 8, Direction.BIDIRECTIONAL, ("rx0", -1, -1), "read_only_region", False),
        (RW, 8, Direction.TO_DEVICE, ("rx0", 1, 2), "descriptor_direction", False),
    ],
)
def test_guest_caused_map_violations_fail_non_transiently(
    iova: int, size: int, direction: Direction, ctx: tuple[str, int, int], kind: str,
    transient: bool, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    led, _, _ = _ledger()
    with caplog.at_level(logging.WARNING, logger="harness.dma.ledger"):
        h = led.map_page(iova, size, direction, 0, ctx)
    assert led.mapping_error(h) and h.error is not None and h.error.transient is transient
    assert led.violations == {kind: 1} and led.live == 0
    line = caplog.records[-1].getMessage()
    assert kind in line and f"queue {ctx[0]} desc {ctx[1]} iova {iova:#x}" in line


def test_bus_master_off_fails_transiently() -> None:
    led, _, bme = _ledger()
    h = led.map_page(RW, 8, Direction.TO_DEVICE)
    bme[0] = False
    bad = led.map_page(RW, 8, Direction.TO_DEVICE)
    assert bad.error is not None and bad.error.transient
    led.sync_single_for_device(h, Direction.TO_DEVICE)  # counted, not blocked
    assert led.violations == {"bus_master_off": 2}
    bme[0] = True
    led.unmap_page(h, Direction.TO_DEVICE)


def test_unmap_pairing_violations() -> None:
    led, _, _ = _ledger()
    h = led.map_page(RW, 8, Direction.TO_DEVICE)
    led.unmap_page(h, Direction.TO_DEVICE)
    led.unmap_page(h, Direction.TO_DEVICE)
    led.sync_single_for_device(h, Direction.TO_DEVICE)
    failed = led.map_page(0x5000, 8, Direction.TO_DEVICE)
    led.unmap_page(failed, Direction.TO_DEVICE)
    foreign = DirectMapOps(led.memory).map_page(RW, 8, Direction.TO_DEVICE)
    led.unmap_page(foreign, Direction.TO_DEVICE)
    wrong = led.map_page(RW, 8, Direction.FROM_DEVICE)
    led.sync_single_for_cpu(wrong, Direction.TO_DEVICE)
    led.unmap_page(wrong, Direction.TO_DEVICE)
    assert dict(led.violations) == {
        "double_unmap": 1, "use_after_unmap": 1, "unmapped_iova": 1, "unmap_failed_handle": 1,
        "unknown_unmap": 1, "direction_mismatch": 2,
    }  # fmt: skip
    assert led.live == 0 and led.unmaps == 2


def test_leaks_are_counted_and_reclaimed() -> None:
    led, _, _ = _ledger("bounce")
    led.map_page(RW, 8, Direction.TO_DEVICE, 0, ("tx0", 7, 0))
    led.map_page(RW + 64, 8, Direction.FROM_DEVICE, 0, ("rx0", 2, 2))
    led.alloc(64)
    assert led.check_leaks("reset") == 3
    assert led.violations["leak"] == 3 and led.live == 0
    mapops = led.stats()["mapops"]
    assert isinstance(mapops, dict) and mapops["live_slots"] == 0


@pytest.mark.parametrize("kind", ["direct", "bounce"])
def test_revoked_mapping_use_is_a_counted_violation(kind: str) -> None:
    led, mem, _ = _ledger(kind)
    h = led.map_page(RW + 0x10, 16, Direction.FROM_DEVICE, 0, ("rx0", 4, 2))
    mem.remove_range(RW, 4 * P)
    led.sync_single_for_cpu(h, Direction.FROM_DEVICE)
    assert led.violations == {"use_after_revoke": 1}
    led.unmap_page(h, Direction.FROM_DEVICE)  # cleanup is legitimate
    s = led.stats()
    assert s["revocations"] == 1 and s["revoked_handles"] == 1 and s["live"] == 0


def test_check_regions() -> None:
    led, mem, _ = _ledger()
    assert led.check_regions([(RO, P), (RW, 4 * P)])
    assert not led.check_regions([(RW, 4 * P)])  # a stale region in the domain
    mem.remove_range(RO, P)
    assert led.check_regions([(RW, 4 * P)])
    assert led.violations == {"region_mismatch": 1} and led.region_checks == 3


def test_guest_violation_sets_needs_reset_through_the_device() -> None:
    mm = MockMemory()
    bme = [True]
    ops, led = build_mapops("bounce", mm.memory, bus_master=lambda: bme[0])
    assert led is not None
    irq = FakeIrq()
    dev = VirtioNetDevice(ops, irq, FakeBackend(), mac=bytes(6), bus_master=lambda: bme[0])
    d = MockDriver(dev, mm)
    d.init()
    tx = d.queues[1]
    tx.write_desc(0, 0xDEAD0000, 64, 0, 0)  # outside guest memory
    tx.publish(0)
    tx.kick()
    dev.process()
    assert dev.status & C.STATUS_NEEDS_RESET and 0 in irq.vectors
    assert led.violations == {"unmapped_iova": 1}
    d.reset()
    assert led.check_leaks("reset") == 0 and led.live == 0


def test_check_region_per_event() -> None:
    led, mem, _ = _ledger()
    assert led.check_region(RW, 4 * P, present=True)
    assert not led.check_region(RW, P, present=True)  # wrong size
    mem.remove_range(RO, P)
    assert led.check_region(RO, P, present=False)
    assert not led.check_region(RW, 4 * P, present=False)  # stale
    assert led.violations == {"region_mismatch": 2}


def test_buffer_in_an_unmapped_region_is_caught() -> None:
    """After a DMA_UNMAP of a region, a descriptor pointing into it is refused as
    unmapped_iova; a map past the end of guest RAM too (on both indexes)."""
    led, mem, _ = _ledger()
    ok = led.map_page(RO + 8, 8, Direction.TO_DEVICE, 0, ("tx0", 1, 0))
    assert ok.error is None
    led.unmap_page(ok, Direction.TO_DEVICE)
    mem.remove_range(RO, P)
    gone = led.map_page(RO, 8, Direction.TO_DEVICE, 0, ("tx0", 2, 0))
    past = led.map_page(RW + 4 * P, 8, Direction.TO_DEVICE, 0, ("tx0", 3, 0))
    assert led.mapping_error(gone) and led.mapping_error(past)
    assert led.violations == {"unmapped_iova": 2}
