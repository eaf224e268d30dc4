"""virtio-pci modern transport: caps, feature dwords, status dance, reset, register validation."""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.testing.mockdriver import MockDriver, net_rig
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES


def test_caps_layout() -> None:
    dev = net_rig(init=False).device
    parsed = []
    for cap in dev.caps:
        vndr, _, cap_len, cfg_type, bar, _, off, length = struct.unpack_from("<BBBBBBxxII", cap)
        assert vndr == 0x09 and bar == 0 and cap_len == len(cap)
        parsed.append((cfg_type, off, length))
    assert parsed == [
        (C.CapType.COMMON, 0x0000, 0x40),
        (C.CapType.NOTIFY, 0x3000, 8),
        (C.CapType.ISR, 0x1000, 4),
        (C.CapType.DEVICE, 0x2000, 8),
        (C.CapType.PCI_CFG, 0, 0),  # bar/offset/length are the driver's to write
    ]
    assert struct.unpack_from("<I", dev.caps[1], 16)[0] == 4  # notify_off_multiplier
    assert dev.bar0_size == 0x4000 and dev.msix_vectors == 3


def test_feature_dwords_0_to_3() -> None:
    r = net_rig(init=False)
    d = r.driver
    assert d.device_features() == DEFAULT_FEATURES
    for sel in (2, 3, 0xFFFFFFFF):
        d.write(C.COMMON_DFSELECT, 4, sel)
        assert d.read(C.COMMON_DF, 4) == 0
    assert d.negotiate()
    assert r.device.negotiated == DEFAULT_FEATURES
    d.write(C.COMMON_GFSELECT, 4, 1)
    assert d.read(C.COMMON_GF, 4) == DEFAULT_FEATURES >> 32


@pytest.mark.parametrize(
    "wanted",
    [
        DEFAULT_FEATURES | (1 << C.F_RING_PACKED),  # not offered
        DEFAULT_FEATURES & ~(1 << C.F_VERSION_1),  # legacy: we are modern-only
        DEFAULT_FEATURES | (1 << 70),  # a bit in dword 2
    ],
)
def test_features_ok_cleared_for_unoffered(wanted: int) -> None:
    r = net_rig(init=False)
    assert not r.driver.negotiate(wanted)
    assert r.device.status == C.STATUS_ACKNOWLEDGE | C.STATUS_DRIVER
    # DRIVER_OK without FEATURES_OK is refused too.
    r.driver.write(C.COMMON_STATUS, 1, C.STATUS_ACKNOWLEDGE | C.STATUS_DRIVER | C.STATUS_DRIVER_OK)
    assert not r.device.status & C.STATUS_DRIVER_OK


def test_status_dance_and_device_config() -> None:
    r = net_rig()
    d = r.driver
    assert d.status() == 0x0F
    assert bytes(d.read(C.DEVICE_OFFSET + i, 1) for i in range(6)) == bytes.fromhex("525400123456")
    assert d.read(C.DEVICE_OFFSET + 6, 2) == C.NET_S_LINK_UP
    gen = d.read(C.COMMON_CFGGENERATION, 1)
    r.device.set_link(False)
    assert d.read(C.DEVICE_OFFSET + 6, 2) == 0
    assert d.read(C.COMMON_CFGGENERATION, 1) == gen + 1
    assert r.irq.vectors == [0]  # config vector
    assert d.read(C.ISR_OFFSET, 1) == C.ISR_CONFIG
    assert d.read(C.ISR_OFFSET, 1) == 0  # read-to-clear


def test_queue_registers_read_back() -> None:
    r = net_rig()
    d = r.driver
    assert d.read(C.COMMON_NUMQ, 2) == 2
    d.write(C.COMMON_Q_SELECT, 2, 1)
    q = r.tx
    assert d.read(C.COMMON_Q_SIZE, 2) == 256
    assert d.read(C.COMMON_Q_ENABLE, 2) == 1
    assert d.read(C.COMMON_Q_NOFF, 2) == 1
    assert d.read(C.COMMON_Q_MSIX, 2) == 2
    assert d.read(C.COMMON_Q_DESCLO, 4) == q.desc & 0xFFFFFFFF
    assert d.read(C.COMMON_Q_USEDHI, 4) == q.used >> 32
    d.write(C.COMMON_Q_MSIX, 2, 3)  # only vectors 0..2 exist
    assert d.read(C.COMMON_Q_MSIX, 2) == C.NO_VECTOR
    d.write(C.COMMON_MSIX, 2, 99)
    assert d.read(C.COMMON_MSIX, 2) == C.NO_VECTOR
    d.write(C.COMMON_Q_SELECT, 2, 7)  # absent queue
    assert d.read(C.COMMON_Q_SIZE, 2) == 0


def test_queue_size_and_address_writes_validated() -> None:
    r = net_rig(init=False)
    d = r.driver
    assert d.negotiate()
    d.write(C.COMMON_Q_SELECT, 2, 0)
    before = r.device.bad_accesses
    for bad in (0, 3, 512):
        d.write(C.COMMON_Q_SIZE, 2, bad)
    assert d.read(C.COMMON_Q_SIZE, 2) == 256
    assert r.device.bad_accesses == before + 3
    q = d.setup_queue(0, 64)
    assert d.read(C.COMMON_Q_SIZE, 2) == 64
    d.write(C.COMMON_Q_SIZE, 2, 32)  # enabled: frozen
    d.write(C.COMMON_Q_DESCLO, 4, 0x1234)
    assert d.read(C.COMMON_Q_SIZE, 2) == 64
    assert d.read(C.COMMON_Q_DESCLO, 4) == q.desc & 0xFFFFFFFF


def test_reset_semantics() -> None:
    r = net_rig()
    d = r.driver
    d.write(C.COMMON_STATUS, 1, 0)
    assert d.status() == 0
    assert d.read(C.COMMON_MSIX, 2) == C.NO_VECTOR
    for i in range(2):
        d.write(C.COMMON_Q_SELECT, 2, i)
        assert d.read(C.COMMON_Q_ENABLE, 2) == 0
        assert d.read(C.COMMON_Q_MSIX, 2) == C.NO_VECTOR
        assert d.read(C.COMMON_Q_DESCLO, 4) == 0
        assert d.read(C.COMMON_Q_SIZE, 2) == 256
    assert r.device.negotiated == 0 and r.device.resets == 2
    # And the device comes back up after a second probe.
    d.init()
    r.tx.add([bytes(12) + b"again"])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [bytes(12) + b"again"]


@pytest.mark.parametrize(
    ("offset", "count"),
    [
        (C.COMMON_STATUS, 2),  # wrong width
        (C.COMMON_DF + 1, 1),  # not a field start
        (0x40, 4),  # past common cfg
        (0x0FFC, 4),
        (C.ISR_OFFSET + 4, 1),
        (C.DEVICE_OFFSET + 7, 2),  # past the 8-byte device config
        (C.DEVICE_OFFSET + 8, 1),
        (C.NOTIFY_OFFSET + 8, 2),  # queue 2 does not exist
        (0x3FFF, 1),
        (0x4000, 4),  # past BAR0
        (-4, 4),
        (0, 0),
        (0, 16),
    ],
)
def test_bad_accesses_ignored_and_counted(offset: int, count: int) -> None:
    r = net_rig()
    dev = r.device
    before = dev.bad_accesses
    assert dev.bar0_read(offset, count) == bytes(max(count, 0))
    dev.bar0_write(offset, memoryview(b"\xff" * max(count, 0)))
    assert dev.bad_accesses >= before + 1
    assert r.driver.status() == 0x0F


def test_bad_accesses_all_counted_but_the_log_thins_out(
        caplog: pytest.LogCaptureFixture) -> None:
    """A hostile driver's flood of bad accesses: every one counted, the first 20 and then
    every 1000th logged (a fuzz run would otherwise write ~50 MB of log per 100k iterations)."""
    r = net_rig()
    before = r.device.bad_accesses
    with caplog.at_level(logging.WARNING, logger="harness.virtio.pci"):
        for _ in range(2500):
            r.device.bar0_read(0x7FFFFFF0, 4)
    assert r.device.bad_accesses == before + 2500
    logged = [rec.getMessage() for rec in caplog.records if "bad BAR0" in rec.getMessage()]
    assert len(logged) == 20 - before + 2, logged[-3:]
    assert logged[-1].endswith("(2000 so far)") or "2000 so far" in logged[-1], logged[-1]


def test_readonly_and_misplaced_writes() -> None:
    r = net_rig()
    d: MockDriver = r.driver
    before = r.device.bad_accesses
    d.write(C.COMMON_DF, 4, 0xFFFFFFFF)
    d.write(C.COMMON_NUMQ, 2, 9)
    d.write(C.COMMON_CFGGENERATION, 1, 9)
    d.write(C.COMMON_Q_NOFF, 2, 9)
    d.write(C.COMMON_Q_RESET, 2, 1)
    d.write(C.NOTIFY_OFFSET + 2, 2, 0)  # misaligned doorbell
    d.write(C.ISR_OFFSET, 1, 1)
    assert r.device.bad_accesses == before + 7
    assert d.read(C.COMMON_NUMQ, 2) == 2


def test_kick_is_posted_and_counted() -> None:
    r = net_rig()
    r.tx.add([bytes(12) + b"x"])
    r.tx.kick()
    assert r.backend.tx == []  # a doorbell only marks the queue pending
    assert r.device.has_work()
    r.device.process()
    assert r.backend.tx and not r.device.has_work()
    tx0 = r.device.stats()["tx0"]
    assert isinstance(tx0, dict) and tx0["kicks"] == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-8, 0x4010),
            st.binary(min_size=0, max_size=9),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_register_fuzz_never_raises(ops: list[tuple[int, bytes, bool]]) -> None:
    r = net_rig()
    for offset, data, is_write in ops:
        if is_write:
            r.device.bar0_write(offset, memoryview(data))
        else:
            assert len(r.device.bar0_read(offset, len(data))) == len(data)
        r.device.process()
        r.device.on_backend_readable()
