"""Split virtqueue: every kind of malformed ring (NEEDS_RESET: heads, loops, addresses, bad
indirect tables, chains too long; direct descriptors then an indirect table, virtio 1.3
2.7.5.3.2), a buffer beyond max_mapping_size mapped in pieces, and fuzzed rings that never
raise."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.dma import DirectMapOps
from harness.testing.mockdriver import (
    FakeBackend,
    FakeIrq,
    MockDriver,
    MockMemory,
    NetRig,
    net_rig,
)
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES, VirtioNetDevice
from tests.unit.test_virtqueue import HDR, INDIRECT, qstat


def assert_needs_reset(rig: NetRig, queue: str = "tx0") -> None:
    assert rig.device.status & C.STATUS_NEEDS_RESET
    assert qstat(rig, queue, "errors") >= 1
    assert rig.device.stats()["errors"] == qstat(rig, "totals", "errors") >= 1
    assert 0 in rig.irq.vectors  # config interrupt
    assert rig.driver.read(C.COMMON_STATUS, 1) & C.STATUS_NEEDS_RESET
    # Dead until reset: further kicks and traffic do nothing and raise nothing.
    rig.tx.kick()
    rig.device.process()
    assert not rig.device.rx_wanted()
    rig.device.on_backend_readable()


# ---- malformed rings -------------------------------------------------------------------------


Setup = Callable[[NetRig], None]


def head_out_of_range(r: NetRig) -> None:
    r.tx.set_avail_slot(0, 256)
    r.tx.set_avail_idx(1)


def descriptor_loop(r: NetRig) -> None:
    buf = r.driver.mem.alloc(64)
    r.tx.write_desc(0, buf, 12, C.DESC_F_NEXT, 1)
    r.tx.write_desc(1, buf, 12, C.DESC_F_NEXT, 0)
    r.tx.publish(0)


def self_loop(r: NetRig) -> None:
    buf = r.driver.mem.alloc(64)
    r.tx.write_desc(3, buf, 12, C.DESC_F_NEXT, 3)
    r.tx.publish(3)


def next_out_of_range(r: NetRig) -> None:
    buf = r.driver.mem.alloc(64)
    r.tx.write_desc(0, buf, 12, C.DESC_F_NEXT, 4096)
    r.tx.publish(0)


def address_outside_memory(r: NetRig) -> None:
    r.tx.write_desc(0, 0xDEAD_0000, 64, 0, 0)
    r.tx.publish(0)


def straddles_memory_end(r: NetRig) -> None:
    mem = r.driver.mem
    r.tx.write_desc(0, mem.base + mem.size - 8, 64, 0, 0)
    r.tx.publish(0)


def avail_idx_jump(r: NetRig) -> None:
    r.tx.set_avail_idx(257)


def avail_idx_backwards(r: NetRig) -> None:
    r.tx.set_avail_idx(0xFFFF)


def writable_before_readable(r: NetRig) -> None:
    buf = r.driver.mem.alloc(64)
    r.tx.write_desc(0, buf, 16, C.DESC_F_WRITE | C.DESC_F_NEXT, 1)
    r.tx.write_desc(1, buf, 16, 0, 0)
    r.tx.publish(0)


def tx_without_header(r: NetRig) -> None:
    r.tx.add([b"short"])


def tx_with_writable(r: NetRig) -> None:
    r.tx.add([HDR + b"x"], [64])


def indirect_not_negotiated(r: NetRig) -> None:
    table = r.driver.mem.alloc(16)
    r.tx.write_desc(0, table, 16, C.DESC_F_INDIRECT, 0)
    r.tx.publish(0)


MALFORMED: list[Setup] = [
    head_out_of_range,
    descriptor_loop,
    self_loop,
    next_out_of_range,
    address_outside_memory,
    straddles_memory_end,
    avail_idx_jump,
    avail_idx_backwards,
    writable_before_readable,
    tx_without_header,
    tx_with_writable,
    indirect_not_negotiated,
]


@pytest.mark.parametrize("setup", MALFORMED, ids=lambda f: f.__name__)
def test_malformed_ring_sets_needs_reset(setup: Setup) -> None:
    r = net_rig()
    setup(r)
    r.tx.kick()
    r.device.process()  # must not raise
    assert r.backend.tx == []
    assert_needs_reset(r)
    # A reset and a fresh probe bring the device back.
    r.driver.init()
    assert r.device.stats()["needs_reset"] is False
    r.tx.add([HDR + b"ok"])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [HDR + b"ok"]


def _indirect(r: NetRig, entries: list[tuple[int, int, int, int]], flags: int = 0) -> None:
    mem = r.driver.mem
    table = mem.alloc(16 * max(len(entries), 1))
    for k, e in enumerate(entries):
        mem.write(table + 16 * k, struct.pack("<QIHH", *e))
    r.tx.write_desc(0, table, 16 * len(entries), C.DESC_F_INDIRECT | flags, 0)
    r.tx.publish(0)


@pytest.mark.parametrize(
    "case", ["bad_len", "zero_len", "nested", "with_next", "loop", "next_oob", "table_oob"]
)
def test_bad_indirect(case: str) -> None:
    r = net_rig(features=INDIRECT)
    buf = r.driver.mem.alloc(64)
    if case == "bad_len":
        r.tx.write_desc(0, buf, 20, C.DESC_F_INDIRECT, 0)
        r.tx.publish(0)
    elif case == "zero_len":
        r.tx.write_desc(0, buf, 0, C.DESC_F_INDIRECT, 0)
        r.tx.publish(0)
    elif case == "nested":
        _indirect(r, [(buf, 16, C.DESC_F_INDIRECT, 0)])
    elif case == "with_next":
        _indirect(r, [(buf, 12, 0, 0)], flags=C.DESC_F_NEXT)
    elif case == "loop":
        _indirect(r, [(buf, 12, C.DESC_F_NEXT, 1), (buf, 12, C.DESC_F_NEXT, 0)])
    elif case == "next_oob":
        _indirect(r, [(buf, 12, C.DESC_F_NEXT, 2), (buf, 12, 0, 0)])
    else:
        r.tx.write_desc(0, 0xBAD0_0000, 32, C.DESC_F_INDIRECT, 0)
        r.tx.publish(0)
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == []
    assert_needs_reset(r)


def test_single_len_beyond_max_mapping_size_is_mapped_in_pieces() -> None:
    # max_mapping_size bounds one mapping, not a descriptor: the device maps a longer buffer in
    # pieces (a guest cannot be told the device's limit, so refusing would reset real guests).
    mem = MockMemory()
    backend = FakeBackend()
    dev = VirtioNetDevice(
        DirectMapOps(mem.memory, max_mapping_size=0x1000),
        FakeIrq(),
        backend,
        mac=bytes(6),
        bus_master=lambda: True,
    )
    d = MockDriver(dev, mem)
    d.init()
    frame = HDR + bytes(range(256)) * 16
    d.queues[1].add([frame])
    d.queues[1].kick()
    dev.process()
    assert not dev.status & C.STATUS_NEEDS_RESET and dev.stats()["errors"] == 0
    assert backend.tx == [frame]


def test_chain_length_overflow() -> None:
    try:
        big = mmap.mmap(-1, (1 << 32) + 0x10000)  # sparse: only touched pages get memory
    except (OSError, ValueError, OverflowError):
        pytest.skip("cannot reserve 4 GiB of address space")
    mem = MockMemory()
    mem.memory.add_region(1 << 40, memoryview(big), writable=True)
    irq = FakeIrq()
    dev = VirtioNetDevice(
        DirectMapOps(mem.memory), irq, FakeBackend(), mac=bytes(6), bus_master=lambda: True
    )
    d = MockDriver(dev, mem)
    d.init()
    tx = d.queues[1]
    tx.write_desc(0, 1 << 40, 0xFFFFFFFF, C.DESC_F_NEXT, 1)
    tx.write_desc(1, (1 << 40) + 0x100, 0x10, 0, 0)
    tx.publish(0)
    tx.kick()
    dev.process()
    assert dev.status & C.STATUS_NEEDS_RESET and dev.stats()["errors"] == 1
    assert irq.vectors == [0]


# ---- fuzz ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.binary(min_size=16 * 16, max_size=16 * 16),
    ring=st.lists(st.integers(0, 0xFFFF), min_size=16, max_size=16),
    idx=st.integers(0, 0xFFFF),
    frames=st.lists(st.binary(min_size=0, max_size=200), max_size=4),
    indirect=st.booleans(),
)
def test_fuzzed_rings_never_raise(
    table: bytes, ring: list[int], idx: int, frames: list[bytes], indirect: bool
) -> None:
    feats = INDIRECT if indirect else DEFAULT_FEATURES
    r = net_rig(features=feats, queue_size=16, mem_size=64 << 10)
    mem = r.driver.mem
    # Point some descriptor addresses into real memory so walks get past the first map.
    tbl = bytearray(table)
    for k in range(0, 16, 2):
        tbl[16 * k : 16 * k + 8] = (mem.base + 0x8000 + 64 * k).to_bytes(8, "little")
    for q in (r.rx, r.tx):
        mem.write(q.desc, bytes(tbl))
        for slot, head in enumerate(ring):
            q.set_avail_slot(slot, head % 32)
        q.set_avail_idx(idx)
    r.backend.rx.extend(frames)
    r.tx.kick()
    r.rx.kick()
    r.device.process()
    r.device.on_backend_readable()
    r.device.process()
    s = r.device.stats()
    assert isinstance(s["errors"], int)
    if s["errors"]:
        assert r.device.status & C.STATUS_NEEDS_RESET


# ---- direct descriptors followed by one indirect (virtio 1.3 2.7.5.3.2) ---------------------


def _direct_then_indirect(r: NetRig, direct: list[tuple[int, int, int]],
                          table: list[tuple[int, int, int, int]], flags: int = 0) -> None:
    """Descriptors 0..k-1 direct (NEXT-linked), then descriptor k pointing at ``table``."""
    mem = r.driver.mem
    t = mem.alloc(16 * max(len(table), 1))
    for k, e in enumerate(table):
        mem.write(t + 16 * k, struct.pack("<QIHH", *e))
    for k, (addr, length, f) in enumerate(direct):
        r.tx.write_desc(k, addr, length, f | C.DESC_F_NEXT, k + 1)
    r.tx.write_desc(len(direct), t, 16 * len(table), C.DESC_F_INDIRECT | flags, 0)
    r.tx.publish(0)
    r.tx.kick()
    r.device.process()


def test_direct_descriptors_then_indirect_table_in_one_chain() -> None:
    r = net_rig(features=INDIRECT)
    mem = r.driver.mem
    a, b, c = mem.alloc(12), mem.alloc(3), mem.alloc(5)
    mem.write(a, HDR)
    mem.write(b, b"abc")
    mem.write(c, b"defgh")
    _direct_then_indirect(r, [(a, 12, 0), (b, 3, 0)], [(c, 5, 0, 0)])
    assert r.backend.tx == [HDR + b"abcdefgh"]
    assert not r.device.status & C.STATUS_NEEDS_RESET


@pytest.mark.parametrize("case", ["readable_after_writable", "indirect_with_next",
                                  "indirect_in_the_middle", "nested"])
def test_bad_direct_then_indirect(case: str) -> None:
    r = net_rig(features=INDIRECT)
    buf = r.driver.mem.alloc(64)
    if case == "readable_after_writable":  # WRITE direct, then a readable one in the table
        _direct_then_indirect(r, [(buf, 12, 0), (buf, 8, C.DESC_F_WRITE)], [(buf, 4, 0, 0)])
    elif case == "indirect_with_next":
        _direct_then_indirect(r, [(buf, 12, 0)], [(buf, 4, 0, 0)], flags=C.DESC_F_NEXT)
    elif case == "indirect_in_the_middle":  # the indirect one NEXT-links to a direct one
        _direct_then_indirect(r, [(buf, 12, 0)], [(buf, 4, 0, 0)], flags=C.DESC_F_NEXT)
        r.tx.write_desc(2, buf, 4, 0, 0)
    else:
        _direct_then_indirect(r, [(buf, 12, 0)], [(buf, 16, C.DESC_F_INDIRECT, 0)])
    assert r.backend.tx == []
    assert_needs_reset(r)
