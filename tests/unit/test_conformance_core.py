"""virtio 1.3 device requirements of chapter 2 (status, features, reset, config space, split
virtqueues), one test per requirement, named after its section; docs/CONFORMANCE.md maps them.

Tests marked ``xfail(strict=True)`` check a requirement the device does not meet yet: they pass
while the gap is there and fail once it is closed (then drop the mark and update the map).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from harness.dma import DirectMapOps
from harness.testing.mockdriver import MockDriver, MockMemory, MockQueue, NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES, OFFLOAD_FEATURES, SUPPORTED_FEATURES
from harness.virtio.pci import TRANSPORT_FEATURES
from harness.virtio.virtqueue import SplitVirtqueue

HDR = bytes(12)
NO_EVENT_IDX = DEFAULT_FEATURES & ~(1 << C.F_EVENT_IDX)
INDIRECT = DEFAULT_FEATURES | (1 << C.F_INDIRECT_DESC)
#: The feature sets the server offers (harness/server/assembly.py): defaults, plus offloads,
#: plus ACCESS_PLATFORM, in any combination.
OFFERED_SETS = [
    DEFAULT_FEATURES,
    DEFAULT_FEATURES | OFFLOAD_FEATURES,
    DEFAULT_FEATURES | (1 << C.F_ACCESS_PLATFORM),
    DEFAULT_FEATURES | OFFLOAD_FEATURES | (1 << C.F_ACCESS_PLATFORM),
]


def snapshot(r: NetRig) -> bytes:
    return bytes(r.driver.mem.buf)


def changed_ranges(before: bytes, after: bytes, base: int) -> list[int]:
    """IOVAs of every byte that differs."""
    return [base + i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]


def used_ring_bytes(q: MockQueue) -> range:
    return range(q.used, q.used + 6 + 8 * q.size)


# ---- 2.1 Device Status Field ------------------------------------------------------------------


def test_2_1_2_no_buffers_consumed_or_notified_before_driver_ok() -> None:
    r = net_rig(init=False)
    d = r.driver
    assert d.negotiate()
    d.write(C.COMMON_MSIX, 2, 0)
    d.queues = [d.setup_queue(0), d.setup_queue(1)]
    r.tx.add([HDR + b"early"])
    r.tx.kick()
    r.rx.add(in_=[2048])
    r.rx.kick()
    r.backend.rx.append(HDR + b"in")
    for _ in range(3):
        r.device.process()
        r.device.on_backend_readable()
    assert r.backend.tx == [] and list(r.backend.rx) == [HDR + b"in"]
    assert r.tx.used_idx() == 0 and r.rx.used_idx() == 0 and r.irq.vectors == []
    # DRIVER_OK: what was posted and kicked before is served now.
    d.write(C.COMMON_STATUS, 1, d.status() | C.STATUS_DRIVER_OK)
    r.device.process()
    r.device.on_backend_readable()
    assert r.backend.tx == [HDR + b"early"] and r.rx.used_idx() == 1


def test_2_1_2_needs_reset_sends_config_change_notification() -> None:
    r = net_rig()
    r.tx.add([b"short"])  # no whole vnet header: an error state
    r.tx.kick()
    r.device.process()
    assert r.driver.status() & C.STATUS_NEEDS_RESET
    assert r.irq.vectors == [0]  # the config vector, nothing else
    assert r.driver.read(C.ISR_OFFSET, 1) & C.ISR_CONFIG


# ---- 2.2 Feature Bits -------------------------------------------------------------------------

#: 5.1.3.1: feature -> features of which at least one must be offered with it.
NET_REQUIRES = {
    C.NET_F_GUEST_TSO4: [C.NET_F_GUEST_CSUM],
    C.NET_F_GUEST_TSO6: [C.NET_F_GUEST_CSUM],
    C.NET_F_GUEST_ECN: [C.NET_F_GUEST_TSO4, C.NET_F_GUEST_TSO6],
    C.NET_F_GUEST_UFO: [C.NET_F_GUEST_CSUM],
    C.NET_F_HOST_TSO4: [C.NET_F_CSUM],
    C.NET_F_HOST_TSO6: [C.NET_F_CSUM],
}
#: Bits the spec defines and this device implements when it offers them (1.3, 5.1.3 and 6).
IMPLEMENTED_BITS = {
    C.NET_F_CSUM, C.NET_F_GUEST_CSUM, C.NET_F_MAC, C.NET_F_GUEST_TSO4, C.NET_F_GUEST_TSO6,
    C.NET_F_HOST_TSO4, C.NET_F_HOST_TSO6, C.NET_F_MRG_RXBUF, C.NET_F_STATUS, C.NET_F_MTU,
    C.NET_F_CTRL_VQ, C.NET_F_CTRL_RX, C.NET_F_CTRL_RX_EXTRA, C.NET_F_CTRL_MAC_ADDR,
    C.F_INDIRECT_DESC, C.F_EVENT_IDX, C.F_VERSION_1, C.F_ACCESS_PLATFORM,
}  # fmt: skip


def _offer_violations(offered: int) -> list[str]:
    bad = []
    for bit, needs in NET_REQUIRES.items():
        if offered >> bit & 1 and not any(offered >> n & 1 for n in needs):
            bad.append(f"bit {bit} needs one of {needs}")
    return bad


@pytest.mark.parametrize("offered", OFFERED_SETS, ids=hex)
def test_2_2_2_no_feature_offered_without_the_features_it_requires(offered: int) -> None:
    r = net_rig(features=offered, init=False)
    assert r.driver.device_features() == offered
    assert _offer_violations(offered) == []


def test_2_2_2_device_refuses_to_offer_a_feature_without_its_requirement() -> None:
    with pytest.raises(ValueError):
        net_rig(features=DEFAULT_FEATURES | (1 << C.NET_F_HOST_TSO4), init=False)


def test_2_2_2_offers_only_defined_features_it_implements() -> None:
    bits = {b for b in range(128) if SUPPORTED_FEATURES >> b & 1}
    assert bits <= IMPLEMENTED_BITS
    assert TRANSPORT_FEATURES & ~SUPPORTED_FEATURES == 0
    for offered in OFFERED_SETS:
        r = net_rig(features=offered, init=False)
        assert {b for b in range(128) if r.driver.device_features() >> b & 1} <= IMPLEMENTED_BITS


@pytest.mark.parametrize(
    "wanted",
    [
        DEFAULT_FEATURES | (1 << C.NET_F_CSUM),  # offered only with offloads
        DEFAULT_FEATURES | (1 << C.F_INDIRECT_DESC) | (1 << 63),
        (1 << C.F_VERSION_1) | (1 << 100),
    ],
    ids=["csum-not-offered", "bit-63", "bit-100"],
)
def test_2_2_2_features_ok_fails_for_features_not_offered(wanted: int) -> None:
    r = net_rig(init=False)
    assert not r.driver.negotiate(wanted)
    assert not r.driver.status() & C.STATUS_FEATURES_OK
    assert r.device.negotiated == 0


# ---- 2.4 Device Reset -------------------------------------------------------------------------


def test_2_4_1_status_reads_zero_after_reset() -> None:
    r = net_rig()
    r.device.device_error("test")  # NEEDS_RESET too: a reset clears everything
    r.driver.write(C.COMMON_STATUS, 1, 0)
    assert r.driver.status() == 0


def test_2_4_1_no_notifications_or_queue_access_after_reset() -> None:
    r = net_rig(features=NO_EVENT_IDX)
    r.rx.add(in_=[2048])
    r.rx.kick()
    r.device.process()
    tx, rx = r.tx, r.rx
    r.driver.write(C.COMMON_STATUS, 1, 0)
    r.irq.vectors.clear()
    before = snapshot(r)
    # The driver (or a stale doorbell) touches the old rings; frames arrive; the link flaps.
    tx.add([HDR + b"after reset"])
    tx.kick()
    rx.kick()
    r.backend.rx.append(HDR + b"in")
    mid = snapshot(r)
    for _ in range(3):
        r.device.process()
        r.device.on_backend_readable()
    r.device.set_link(False)
    r.device.set_link(True)
    assert r.irq.vectors == []
    assert r.backend.tx == []
    assert snapshot(r) == mid  # not a byte of guest memory written
    assert before != mid
    assert r.driver.status() == 0


# ---- 2.5 Device Configuration Space -----------------------------------------------------------


def test_2_5_2_device_config_readable_before_features_ok() -> None:
    r = net_rig(init=False)
    d = r.driver
    d.reset()
    for status in (0, C.STATUS_ACKNOWLEDGE, C.STATUS_ACKNOWLEDGE | C.STATUS_DRIVER):
        if status:
            d.write(C.COMMON_STATUS, 1, status)
        mac = bytes(d.read(C.DEVICE_OFFSET + i, 1) for i in range(6))
        assert mac == bytes.fromhex("525400123456")
        assert d.read(C.DEVICE_OFFSET + 6, 2) == C.NET_S_LINK_UP  # STATUS-conditional field
        assert d.read(C.DEVICE_OFFSET, 4) == int.from_bytes(mac[:4], "little")
    assert r.device.bad_accesses == 0


# ---- 2.7 Split Virtqueues ---------------------------------------------------------------------


def test_2_7_4_1_no_assumption_about_descriptor_arrangement_tx() -> None:
    r = net_rig(features=INDIRECT)
    data = bytes(range(200))
    frame_ = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0) + data
    layouts = [
        [frame_],  # header and data in one descriptor
        [frame_[:5], frame_[5:9], frame_[9:12], frame_[12:50], frame_[50:]],  # header split
        [frame_[:11], frame_[11:13], frame_[13:]],  # header and data share a descriptor
        [frame_[:12]] + [frame_[k : k + 1] for k in range(12, 30)] + [frame_[30:]],
    ]
    for out in layouts:
        r.tx.add(out)
    r.tx.add_indirect([frame_[:3], frame_[3:]])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [frame_] * 5
    assert not r.device.status & C.STATUS_NEEDS_RESET


@pytest.mark.parametrize("sizes", [[12, 2000], [11, 1, 2000], [10, 2, 2000], [4, 4, 4, 2000],
                                   [1] * 12 + [2000], [3000]])  # fmt: skip
def test_2_7_4_1_no_assumption_about_descriptor_arrangement_rx(sizes: list[int]) -> None:
    r = net_rig(features=DEFAULT_FEATURES & ~(1 << C.NET_F_MRG_RXBUF), queue_size=16)
    r.rx.add(in_=sizes)
    r.rx.kick()
    r.device.process()
    f = bytes(12) + bytes((7 * i) & 0xFF for i in range(1000))
    r.backend.rx.append(f)
    r.device.on_backend_readable()
    [(head, n)] = r.rx.get_used()
    assert n == len(f)
    assert r.rx.written(head, n) == f[:10] + b"\x01\x00" + f[12:]


def _all_memory_writes(r: NetRig, run: Callable[[], None]) -> list[int]:
    before = snapshot(r)
    run()
    return changed_ranges(before, snapshot(r), r.driver.mem.base)


def test_2_7_5_1_no_write_to_device_readable_buffers_or_descriptor_tables() -> None:
    r = net_rig(features=INDIRECT)
    r.tx.add([HDR + b"one"])
    r.tx.add([HDR, b"two", b"three"])
    r.tx.add_indirect([HDR, b"four"])

    def tx() -> None:
        r.tx.kick()
        r.device.process()

    written = _all_memory_writes(r, tx)
    assert len(r.backend.tx) == 3
    allowed = used_ring_bytes(r.tx)
    assert written and all(a in allowed for a in written)


def test_2_7_5_1_rx_writes_only_used_ring_and_device_writable_buffers() -> None:
    r = net_rig(features=INDIRECT)
    r.rx.add(in_=[1000, 1000])
    r.rx.add_indirect(in_=[600, 1000])
    r.rx.kick()
    r.device.process()
    writable: set[int] = set()
    for bufs in r.rx.buffers.values():
        for b in bufs:
            assert b.writable
            writable.update(range(b.iova, b.iova + b.length))
    r.backend.rx.extend([HDR + bytes([1]) * 1500, HDR + bytes([2]) * 100])

    def rx() -> None:
        r.device.on_backend_readable()

    written = _all_memory_writes(r, rx)
    allowed = set(used_ring_bytes(r.rx)) | writable
    assert written and all(a in allowed for a in written)
    assert len(r.rx.get_used()) >= 2


def test_2_7_5_1_malformed_chain_leaves_descriptor_table_untouched() -> None:
    r = net_rig()
    buf = r.driver.mem.alloc(64)
    r.tx.write_desc(0, buf, 16, C.DESC_F_WRITE | C.DESC_F_NEXT, 1)
    r.tx.write_desc(1, buf, 16, 0, 0)
    r.tx.publish(0)

    def tx() -> None:
        r.tx.kick()
        r.device.process()

    written = _all_memory_writes(r, tx)
    assert r.device.status & C.STATUS_NEEDS_RESET
    assert all(a in used_ring_bytes(r.tx) for a in written)


def test_2_7_5_3_2_write_flag_on_the_indirect_descriptor_is_ignored() -> None:
    r = net_rig(features=INDIRECT)
    head = r.tx.add_indirect([HDR, b"payload"])
    _, length, flags, nxt = struct.unpack("<QIHH", r.driver.mem.read(r.tx.desc + 16 * head, 16))
    r.tx.write_desc(head, struct.unpack("<Q", r.driver.mem.read(r.tx.desc + 16 * head, 8))[0],
                    length, flags | C.DESC_F_WRITE, nxt)  # fmt: skip
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [HDR + b"payload"]
    assert not r.device.status & C.STATUS_NEEDS_RESET


def test_2_7_5_3_2_direct_descriptors_followed_by_one_indirect_are_handled() -> None:
    r = net_rig(features=INDIRECT)
    mem = r.driver.mem
    hdr_buf = mem.alloc(12)
    mem.write(hdr_buf, HDR)
    data = mem.alloc(4)
    mem.write(data, b"data")
    table = mem.alloc(16)
    mem.write(table, struct.pack("<QIHH", data, 4, 0, 0))
    r.tx.write_desc(0, hdr_buf, 12, C.DESC_F_NEXT, 1)
    r.tx.write_desc(1, table, 16, C.DESC_F_INDIRECT, 0)
    r.tx.publish(0)
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [HDR + b"data"]
    assert not r.device.status & C.STATUS_NEEDS_RESET


def _tx_batch(r: NetRig, n: int) -> None:
    for _ in range(n):
        r.tx.add([HDR + b"x"])
    r.tx.kick()
    r.device.process()
    r.tx.get_used()


def test_2_7_7_2_without_event_idx_used_event_is_ignored() -> None:
    r = net_rig(features=NO_EVENT_IDX)
    for used_event in (5, 0, 0xFFFF, 1):
        r.tx.set_used_event(used_event)  # would suppress these interrupts under EVENT_IDX
        r.irq.vectors.clear()
        _tx_batch(r, 1)
        assert r.irq.vectors == [2]


def test_2_7_7_2_without_event_idx_flags_0_means_notify() -> None:
    r = net_rig(features=NO_EVENT_IDX)
    for n in (1, 3, 1):
        r.irq.vectors.clear()
        r.tx.set_avail_flags(0)
        _tx_batch(r, n)
        assert r.irq.vectors == [2]
    r.backend.rx.append(HDR + b"in")
    r.rx.add(in_=[2048])
    r.rx.kick()
    r.device.process()
    r.device.on_backend_readable()
    assert r.irq.vectors[-1] == 1


def test_2_7_7_2_with_event_idx_the_no_interrupt_flag_is_ignored() -> None:
    r = net_rig()
    r.tx.set_avail_flags(C.AVAIL_F_NO_INTERRUPT)
    r.tx.set_used_event(0)
    _tx_batch(r, 1)  # placed at used idx 0 == used_event
    assert r.irq.vectors == [2]


def test_2_7_7_2_with_event_idx_notify_when_used_idx_reaches_used_event() -> None:
    r = net_rig()
    r.tx.set_used_event(2)
    _tx_batch(r, 2)  # entries at 0, 1
    assert r.irq.vectors == []
    _tx_batch(r, 1)  # entry at 2 == used_event
    assert r.irq.vectors == [2]
    # Across the 16-bit wrap: used_event 0xFFFF is reached after 65536 - 3 more entries.
    r.tx.set_used_event(0xFFFF)
    r.irq.vectors.clear()
    done = 3
    while done < 0xFFFF:
        n = min(200, 0xFFFF - done)
        _tx_batch(r, n)
        done += n
        r.backend.tx.clear()
    assert r.irq.vectors == []
    _tx_batch(r, 1)
    assert r.irq.vectors == [2] and r.tx.used_idx() == 0


def test_2_7_8_2_len_set_before_used_idx_is_updated() -> None:
    mem = MockMemory()
    q = SplitVirtqueue(0, 8, DirectMapOps(mem.memory), name="q", on_error=lambda *_: None)
    drv = MockDriver.__new__(MockDriver)
    drv.mem = mem
    drv.event_idx = False
    d = MockQueue(drv, 0, 8, mem.alloc(128), mem.alloc(22), mem.alloc(70))
    q.size = 8
    q.desc_addr, q.avail_addr, q.used_addr = d.desc, d.avail, d.used
    assert q.enable(event_idx=False, indirect=False)
    d.add(in_=[64])
    chain = q.pop()
    assert chain is not None
    chain.writable[0].view[:5] = b"hello"
    q.push(chain, 5)
    # The entry (id, len) is in the ring, used.idx still says it is not there.
    head, length = struct.unpack("<II", mem.read(d.used + 4, 8))
    assert (head, length) == (0, 5) and d.used_idx() == 0
    q.flush()
    assert d.used_idx() == 1
    assert d.get_used() == [(0, 5)] and d.written(0, 5) == b"hello"


def test_2_7_8_2_len_bytes_written_from_the_first_writable_buffer() -> None:
    r = net_rig()
    r.rx.add(in_=[100, 100, 2000])  # one chain, three writable descriptors
    r.rx.kick()
    r.device.process()
    f = HDR + bytes((i * 13) & 0xFF for i in range(700))
    r.backend.rx.append(f)
    r.device.on_backend_readable()
    [(head, n)] = r.rx.get_used()
    assert n == len(f)
    bufs = r.rx.completed[head]
    got = b"".join(r.driver.mem.read(b.iova, b.length) for b in bufs)[:n]
    assert got == f[:10] + b"\x01\x00" + f[12:]


def _used_flags_seen(r: NetRig) -> set[int]:
    seen = {r.rx.used_flags(), r.tx.used_flags()}
    r.backend.rx.append(HDR + b"a")
    r.device.on_backend_readable()  # starves
    seen |= {r.rx.used_flags()}
    for _ in range(4):
        r.rx.add(in_=[2048])
    r.rx.kick()
    r.device.process()
    r.backend.rx.extend([HDR + b"b"] * 2)
    r.device.on_backend_readable()  # buffers in hand
    seen |= {r.rx.used_flags()}
    for _ in range(3):
        r.tx.add([HDR + b"c"])
    r.tx.kick()
    r.device.process()
    seen |= {r.tx.used_flags(), r.rx.used_flags()}
    r.backend.rx.extend([HDR + b"d"] * 4)
    r.device.on_backend_readable()
    seen |= {r.rx.used_flags()}
    return seen


def test_2_7_10_2_without_event_idx_used_flags_are_0_or_1() -> None:
    seen = _used_flags_seen(net_rig(features=NO_EVENT_IDX))
    assert seen <= {0, C.USED_F_NO_NOTIFY}
    assert seen == {0, C.USED_F_NO_NOTIFY}  # both states are reached (the test means it)


def test_2_7_10_2_with_event_idx_used_flags_are_0() -> None:
    assert _used_flags_seen(net_rig()) == {0}


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, NO_EVENT_IDX], ids=["event_idx", "flags"])
def test_2_7_10_2_spurious_notifications_are_handled(features: int) -> None:
    r = net_rig(features=features)
    for _ in range(5):
        r.tx.kick()
        r.rx.kick()
        r.device.process()
        r.device.on_backend_readable()
    _tx_batch(r, 2)
    for _ in range(3):
        r.tx.kick()  # nothing new since the last kick
        r.device.process()
    assert r.tx.used_idx() == 2 and len(r.backend.tx) == 2
    assert r.irq.vectors == [2]
    assert r.device.stats()["errors"] == 0 and not r.device.status & C.STATUS_NEEDS_RESET
    assert r.device.bad_accesses == 0
