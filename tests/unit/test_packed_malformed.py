"""Packed virtqueues (virtio 1.3 2.8): every malformed ring the device must refuse
(NEEDS_RESET, nothing mapped left, never a raise), and fuzzed rings that must never raise.

The rig (driver side harness.testing.mockpacked, the device's mappings through the DMA ledger,
so a chain refused half way must leave nothing mapped) is tests/unit/test_packed.py's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.testing.mockpacked import avail_flags
from harness.virtio import constants as C
from tests.unit.test_packed import HDR, PACKED, RINGS, TX, Rig, rig

NO_INDIRECT = PACKED & ~(1 << C.F_INDIRECT_DESC)


# ---- malformed rings -------------------------------------------------------------------------

Setup = Callable[[Rig], None]


def _raw(r: Rig, descs: list[tuple[int, int, int, int]]) -> None:
    r.tx.make_avail(descs)


def _buf(r: Rig, data: bytes = HDR + b"x" * 50) -> int:
    iova = r.driver.mem.alloc(len(data))
    r.driver.mem.write(iova, data)
    return iova


def chain_longer_than_queue(r: Rig) -> None:
    b = _buf(r)
    _raw(r, [(b, 16, 0, C.DESC_F_NEXT)] * r.tx.size)


def chain_descriptor_not_available(r: Rig) -> None:
    b = _buf(r)
    r.tx.make_avail([(b, 16, 0, C.DESC_F_NEXT)])  # its successor never made available
    r.tx.write_desc(1, b, 16, avail_flags(0), 0)  # the previous lap's AVAIL/USED bits


def buffer_id_out_of_range(r: Rig) -> None:
    _raw(r, [(_buf(r), 62, 256, 0)])


def buffer_id_reused_in_flight(r: Rig) -> None:
    _raw(r, [(_buf(r), 62, 3, 0)])
    held = r.device.tx.pop()  # popped and not completed: in flight
    assert held is not None
    _raw(r, [(_buf(r), 62, 3, 0)])


def indirect_not_negotiated(r: Rig) -> None:
    t = r.driver.mem.alloc(16)
    r.driver.mem.write(t, struct.pack("<QIHH", _buf(r), 62, 0, 0))
    _raw(r, [(t, 16, 0, C.DESC_F_INDIRECT)])


def indirect_with_next(r: Rig) -> None:
    t = r.driver.mem.alloc(16)
    r.driver.mem.write(t, struct.pack("<QIHH", _buf(r), 62, 0, 0))
    _raw(r, [(t, 16, 0, C.DESC_F_INDIRECT | C.DESC_F_NEXT), (_buf(r), 10, 0, 0)])


def indirect_inside_a_chain(r: Rig) -> None:
    t = r.driver.mem.alloc(16)
    r.driver.mem.write(t, struct.pack("<QIHH", _buf(r), 50, 0, 0))
    _raw(r, [(_buf(r), 12, 0, C.DESC_F_NEXT), (t, 16, 0, C.DESC_F_INDIRECT)])


def indirect_table_length_bad(r: Rig) -> None:
    _raw(r, [(r.driver.mem.alloc(32), 24, 0, C.DESC_F_INDIRECT)])


def indirect_table_outside_memory(r: Rig) -> None:
    _raw(r, [(0x7000_0000, 32, 0, C.DESC_F_INDIRECT)])


def address_outside_memory(r: Rig) -> None:
    _raw(r, [(_buf(r), 12, 0, C.DESC_F_NEXT), (0x7000_0000, 50, 0, 0)])


def straddles_memory_end(r: Rig) -> None:
    mem = r.driver.mem
    _raw(r, [(_buf(r), 12, 0, C.DESC_F_NEXT), (mem.base + mem.size - 8, 50, 0, 0)])


def writable_before_readable(r: Rig) -> None:
    _raw(r, [(_buf(r), 12, 0, C.DESC_F_WRITE | C.DESC_F_NEXT), (_buf(r), 50, 0, 0)])


def chain_length_overflow(r: Rig) -> None:
    b = _buf(r)
    _raw(r, [(b, 0x40, 0, C.DESC_F_NEXT), (b, 0xFFFF_FFF0, 0, 0)])  # refused before mapping


def misaligned_ring(r: Rig) -> None:
    d = r.driver
    d.reset()
    d.negotiate(PACKED)
    d.write(C.COMMON_MSIX, 2, 0)
    d.write(C.COMMON_Q_SELECT, 2, TX)
    for off, addr in ((C.COMMON_Q_DESCLO, d.mem.alloc(4096) + 8),
                      (C.COMMON_Q_AVAILLO, d.mem.alloc(4)), (C.COMMON_Q_USEDLO, d.mem.alloc(4))):
        d.write(off, 4, addr)
    d.write(C.COMMON_Q_ENABLE, 2, 1)


#: case -> (setup, features, the words the queue's error names it with)
MALFORMED: dict[str, tuple[Setup, int, str]] = {
    "chain-longer-than-queue": (chain_longer_than_queue, PACKED, "chain longer than the queue"),
    "chain-descriptor-not-available": (chain_descriptor_not_available, PACKED, "not available"),
    "buffer-id-out-of-range": (buffer_id_out_of_range, PACKED, "buffer id 256 out of range"),
    "buffer-id-reused-in-flight": (buffer_id_reused_in_flight, PACKED, "reused while in flight"),
    "indirect-not-negotiated": (indirect_not_negotiated, NO_INDIRECT, "without VIRTIO_F_INDIRECT"),
    "indirect-with-next": (indirect_with_next, PACKED, "INDIRECT descriptor with NEXT"),
    "indirect-inside-a-chain": (indirect_inside_a_chain, PACKED, "in a chain linked by NEXT"),
    "indirect-table-length": (indirect_table_length_bad, PACKED, "bad indirect table length"),
    "indirect-table-outside-memory": (indirect_table_outside_memory, PACKED, "not mappable"),
    "address-outside-memory": (address_outside_memory, PACKED, "not mappable"),
    "straddles-memory-end": (straddles_memory_end, PACKED, "not mappable"),
    "writable-before-readable": (writable_before_readable, PACKED, "readable descriptor after"),
    "chain-length-overflow": (chain_length_overflow, PACKED, "exceeds 2^32 - 1"),
    "misaligned-ring": (misaligned_ring, PACKED, "misaligned rings"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_ring_sets_needs_reset(case: str, caplog: pytest.LogCaptureFixture) -> None:
    setup, feats, words = MALFORMED[case]
    r = rig(feats, size=16)
    setup(r)
    r.tx.kick()
    r.device.process()  # never raises
    assert r.device.status & C.STATUS_NEEDS_RESET, case
    assert r.qstat("tx0", "errors") >= 1 and r.device.tx.broken
    # The ring refused it, for this reason (not the net device for another one).
    errors = [m.getMessage() for m in caplog.records if m.name == "harness.virtio.virtqueue"]
    assert len(errors) == 1 and "virtqueue tx0" in errors[0] and words in errors[0], errors
    assert 0 in r.irq.vectors  # the config interrupt
    assert r.backend.tx == []
    # Nothing of the refused chain stays mapped: the rings (and a chain the test holds).
    held = 1 if case == "buffer-id-reused-in-flight" else 0
    rings = RINGS if case != "misaligned-ring" else 0  # that one set up no other queue
    assert r.ledger.live == rings + held
    r.driver.reset()
    assert r.ledger.live == held  # (the held chain is the test's, never the device's)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring=st.binary(min_size=16 * 8, max_size=16 * 8), events=st.binary(min_size=4, max_size=4),
       frames=st.lists(st.binary(min_size=0, max_size=200), max_size=3))  # fmt: skip
def test_fuzzed_packed_rings_never_raise(ring: bytes, events: bytes, frames: list[bytes]) -> None:
    r = rig(size=8, mem_size=64 << 10)
    mem = r.driver.mem
    raw = bytearray(ring)
    for k in range(0, 8, 2):  # some addresses into real memory, so walks get past the first map
        raw[16 * k : 16 * k + 8] = (mem.base + 0x8000 + 64 * k).to_bytes(8, "little")
    for q in (r.rx, r.tx):
        mem.write(q.desc, bytes(raw))
        mem.write(q.avail, events)
    r.backend.rx.extend(frames)
    r.tx.kick()
    r.rx.kick()
    r.device.process()
    r.device.on_backend_readable()
    r.device.process()
    s = r.device.stats()
    if s["errors"]:
        assert r.device.status & C.STATUS_NEEDS_RESET
    for vq in r.device.queues:
        vq.dump()  # introspection of garbage never raises either
    r.driver.reset()
    assert r.ledger.live == 0
