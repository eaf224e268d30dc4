"""virtio 1.3 device requirements of 4.1 (virtio over PCI: capabilities, common configuration,
notification, ISR, device-specific configuration, MSI-X), one test per requirement, named after
its section; docs/CONFORMANCE.md maps them. ``xfail(strict=True)`` marks a requirement the
device does not meet yet (the test fails once the gap is closed)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.server import assembly
from harness.testing.mockdriver import FakeIrq, NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio import pcicfg
from harness.virtio.net import DEFAULT_FEATURES

HDR = bytes(12)


def caps(r: NetRig) -> list[tuple[int, int, int, int, bytes]]:
    """(cfg_type, bar, offset, length, extra) of every vendor capability."""
    out = []
    for cap in r.device.caps:
        vndr, _, cap_len, cfg_type, bar, _, off, length = struct.unpack_from("<BBBBBBxxII", cap)
        assert vndr == C.PCI_CAP_ID_VNDR
        out.append((cfg_type, bar, off, length, cap[16:cap_len]))
    return out


def of_type(r: NetRig, t: int) -> list[tuple[int, int, int, int, bytes]]:
    return [c for c in caps(r) if c[0] == t]


# ---- 4.1.2 PCI Device Discovery ---------------------------------------------------------------


def test_4_1_2_1_vendor_id_is_0x1af4() -> None:
    assert assembly.VIRTIO_VENDOR == 0x1AF4


def test_4_1_2_1_device_id_is_0x1040_plus_virtio_device_id() -> None:
    assert assembly.VIRTIO_NET_DEVICE_ID == 0x1040 + 1  # network device: virtio device ID 1


# ---- 4.1.4 Virtio Structure PCI Capabilities --------------------------------------------------


def test_4_1_4_2_cap_len_includes_the_extra_data() -> None:
    r = net_rig(init=False)
    for cap in r.device.caps:
        cap_len = cap[2]
        assert cap_len == len(cap) >= 16
    [notify] = of_type(r, C.CapType.NOTIFY)
    assert len(notify[4]) == 4  # notify_off_multiplier is inside cap_len


def test_4_1_4_3_1_common_cfg_present_and_offset_4_byte_aligned() -> None:
    r = net_rig(init=False)
    common = of_type(r, C.CapType.COMMON)
    assert common
    for _, bar, off, length, _ in common:
        assert off % 4 == 0 and length >= C.COMMON_CFG_LEN
        assert off + length <= r.device.bar0_size and bar == 0


def test_4_1_4_3_1_device_feature_presented_per_select() -> None:
    r = net_rig(init=False)
    d = r.driver
    for sel in range(6):
        d.write(C.COMMON_DFSELECT, 4, sel)
        assert d.read(C.COMMON_DF, 4) == (DEFAULT_FEATURES >> (32 * sel)) & 0xFFFFFFFF


def test_4_1_4_3_1_driver_feature_presents_the_valid_bits_written() -> None:
    r = net_rig(init=False)
    d = r.driver
    d.reset()
    d.write(C.COMMON_STATUS, 1, C.STATUS_ACKNOWLEDGE | C.STATUS_DRIVER)
    wanted = DEFAULT_FEATURES & ~(1 << C.NET_F_MRG_RXBUF)
    d.write_features(wanted)
    for sel in (0, 1):
        d.write(C.COMMON_GFSELECT, 4, sel)
        assert d.read(C.COMMON_GF, 4) == (wanted >> (32 * sel)) & 0xFFFFFFFF
    d.write(C.COMMON_GFSELECT, 4, 0)
    d.write(C.COMMON_GF, 4, wanted & 0xFFFF0000)  # rewrite one dword: reads back at once
    assert d.read(C.COMMON_GF, 4) == wanted & 0xFFFF0000


def test_4_1_4_3_1_config_generation_changes_after_a_read_value_changed() -> None:
    r = net_rig()
    d = r.driver
    for up in (False, True, False):
        gen = d.read(C.COMMON_CFGGENERATION, 1)
        before = d.read(C.DEVICE_OFFSET + 6, 2)
        r.device.set_link(up)
        assert d.read(C.DEVICE_OFFSET + 6, 2) != before
        assert d.read(C.COMMON_CFGGENERATION, 1) != gen


def test_4_1_4_3_1_device_status_write_0_resets_and_reads_0() -> None:
    r = net_rig()
    r.tx.add([HDR + b"x"])
    r.tx.kick()
    r.device.process()
    r.driver.write(C.COMMON_STATUS, 1, 0)
    assert r.driver.status() == 0 and r.device.negotiated == 0
    assert r.device.resets == 2  # init's reset and this one


def test_4_1_4_3_1_queue_enable_reads_0_after_reset() -> None:
    r = net_rig()
    d = r.driver
    d.write(C.COMMON_STATUS, 1, 0)
    for i in range(d.read(C.COMMON_NUMQ, 2)):
        d.write(C.COMMON_Q_SELECT, 2, i)
        assert d.read(C.COMMON_Q_ENABLE, 2) == 0


def test_4_1_4_3_1_queue_size_0_for_an_unavailable_queue() -> None:
    r = net_rig()
    d = r.driver
    numq = d.read(C.COMMON_NUMQ, 2)
    for sel in (numq, numq + 1, 0x7FFF, 0xFFFF):
        d.write(C.COMMON_Q_SELECT, 2, sel)
        assert d.read(C.COMMON_Q_SIZE, 2) == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 0xFFFF)), max_size=20))
def test_4_1_4_3_1_queue_size_is_0_or_a_power_of_2(writes: list[tuple[int, int]]) -> None:
    r = net_rig(init=False)
    d = r.driver
    assert d.negotiate()
    for sel, size in writes:
        d.write(C.COMMON_Q_SELECT, 2, sel)
        d.write(C.COMMON_Q_SIZE, 2, size)
        n = d.read(C.COMMON_Q_SIZE, 2)
        assert n == 0 or n & (n - 1) == 0


def test_4_1_4_4_1_notification_capability_without_notification_data() -> None:
    r = net_rig()
    d = r.driver
    notify = of_type(r, C.CapType.NOTIFY)
    assert notify
    for _, _, off, length, extra in notify:
        (mult,) = struct.unpack("<I", extra)
        assert off % 2 == 0
        # 0 or an even power of 2 (4, 16, 64, ...).
        assert mult == 0 or (mult & (mult - 1) == 0 and (mult.bit_length() - 1) % 2 == 0)
        assert length >= 2
        for i in range(d.read(C.COMMON_NUMQ, 2)):
            d.write(C.COMMON_Q_SELECT, 2, i)
            noff = d.read(C.COMMON_Q_NOFF, 2)
            assert length >= noff * mult + 2


def test_4_1_4_5_1_isr_capability_present() -> None:
    r = net_rig(init=False)
    assert of_type(r, C.CapType.ISR)


class IsrAtTrigger(FakeIrq):
    """Records the ISR status the device has set when it raises each vector."""

    def __init__(self) -> None:
        super().__init__()
        self.rig: NetRig | None = None
        self.isr_seen: list[int] = []

    def trigger(self, vector: int) -> None:
        assert self.rig is not None
        self.isr_seen.append(self.rig.device.isr)
        super().trigger(vector)


def _isr_rig() -> tuple[NetRig, IsrAtTrigger]:
    r = net_rig()
    irq = IsrAtTrigger()
    irq.rig = r
    r.device.irq = irq
    r.irq = irq
    return r, irq


def test_4_1_4_5_1_config_bit_set_before_the_config_change_notification() -> None:
    r, irq = _isr_rig()
    r.device.set_link(False)
    assert irq.vectors == [0] and irq.isr_seen[0] & C.ISR_CONFIG


def test_4_1_4_5_1_queue_bit_set_before_the_virtqueue_notification() -> None:
    r, irq = _isr_rig()
    r.tx.add([HDR + b"x"])
    r.tx.kick()
    r.device.process()
    assert irq.vectors == [2] and irq.isr_seen[0] & C.ISR_QUEUE


def test_4_1_4_5_1_isr_reset_to_0_on_driver_read() -> None:
    r = net_rig()
    r.tx.add([HDR + b"x"])
    r.tx.kick()
    r.device.process()
    r.device.set_link(False)
    assert r.driver.read(C.ISR_OFFSET, 1) == C.ISR_QUEUE | C.ISR_CONFIG
    assert r.driver.read(C.ISR_OFFSET, 1) == 0


def test_4_1_4_6_1_device_cfg_offset_4_byte_aligned() -> None:
    r = net_rig(init=False)
    dev = of_type(r, C.CapType.DEVICE)
    assert dev and all(off % 4 == 0 and length >= 8 for _, _, off, length, _ in dev)


def test_4_1_4_9_1_pci_cfg_access_capability_present() -> None:
    r = net_rig(init=False)
    [(_, _, _, _, data)] = of_type(r, C.CapType.PCI_CFG)
    assert len(data) == 4  # u8 pci_cfg_data[4], inside cap_len


def _window(r: NetRig, bar: int, offset: int, length: int) -> None:
    """The driver's set-up of the window: cap.bar, cap.offset, cap.length (config writes)."""
    w = r.device.pci_cfg
    w.write(pcicfg.BAR, memoryview(bytes([bar])))
    w.write(pcicfg.OFFSET, memoryview(offset.to_bytes(4, "little")))
    w.write(pcicfg.LENGTH, memoryview(length.to_bytes(4, "little")))


def test_4_1_4_9_1_write_to_pci_cfg_data_writes_the_bar_at_cap_offset() -> None:
    r = net_rig()
    _window(r, 0, C.COMMON_Q_SELECT, 2)
    r.device.pci_cfg.write(pcicfg.DATA, memoryview(bytes([1, 0, 0xEE, 0xEE])))
    assert r.driver.read(C.COMMON_Q_SELECT, 2) == 1  # the first cap.length bytes, no more
    _window(r, 0, C.COMMON_STATUS, 1)
    resets = r.device.resets
    r.device.pci_cfg.write(pcicfg.DATA, memoryview(bytes(1)))
    assert r.device.resets == resets + 1 and r.driver.status() == 0  # status 0: reset


def test_4_1_4_9_1_read_of_pci_cfg_data_reads_the_bar_at_cap_offset() -> None:
    r = net_rig()
    for off, width in C.COMMON_FIELD_WIDTH.items():
        _window(r, 0, off, width)
        got = r.device.pci_cfg.read(pcicfg.DATA, 4)
        assert got == r.device.bar0_read(off, width).ljust(4, b"\0"), hex(off)
    _window(r, 0, C.DEVICE_OFFSET, 4)
    assert r.device.pci_cfg.read(pcicfg.DATA, 4) == r.device.bar0_read(C.DEVICE_OFFSET, 4)
    assert r.device.pci_cfg.refused == 0


# ---- 4.1.5 PCI-specific Initialization And Device Operation -----------------------------------


def test_4_1_5_1_2_1_any_event_maps_to_any_valid_vector_and_reads_back() -> None:
    r = net_rig()
    d = r.driver
    vectors = r.device.msix_vectors
    for v in range(vectors):
        d.write(C.COMMON_MSIX, 2, v)
        assert d.read(C.COMMON_MSIX, 2) == v
        for q in range(d.read(C.COMMON_NUMQ, 2)):
            d.write(C.COMMON_Q_SELECT, 2, q)
            d.write(C.COMMON_Q_MSIX, 2, v)
            assert d.read(C.COMMON_Q_MSIX, 2) == v
    # The mapping is used: everything on the last vector now.
    r.tx.add([HDR + b"x"])
    r.tx.kick()
    r.device.process()
    r.device.set_link(False)
    assert r.irq.vectors == [vectors - 1, vectors - 1]


def test_4_1_5_1_2_1_any_event_can_be_unmapped() -> None:
    r = net_rig()
    d = r.driver
    d.write(C.COMMON_MSIX, 2, C.NO_VECTOR)
    assert d.read(C.COMMON_MSIX, 2) == C.NO_VECTOR
    for q in range(d.read(C.COMMON_NUMQ, 2)):
        d.write(C.COMMON_Q_SELECT, 2, q)
        d.write(C.COMMON_Q_MSIX, 2, C.NO_VECTOR)
        assert d.read(C.COMMON_Q_MSIX, 2) == C.NO_VECTOR


def test_4_1_5_1_2_1_all_events_unmapped_on_reset() -> None:
    r = net_rig()
    d = r.driver
    d.write(C.COMMON_STATUS, 1, 0)
    assert d.read(C.COMMON_MSIX, 2) == C.NO_VECTOR
    for q in range(d.read(C.COMMON_NUMQ, 2)):
        d.write(C.COMMON_Q_SELECT, 2, q)
        assert d.read(C.COMMON_Q_MSIX, 2) == C.NO_VECTOR


def test_4_1_5_1_2_1_mapping_failure_reads_as_no_vector() -> None:
    r = net_rig()
    d = r.driver
    for bad in (r.device.msix_vectors, 0x7FF, 0xFFFE):
        d.write(C.COMMON_MSIX, 2, bad)
        assert d.read(C.COMMON_MSIX, 2) == C.NO_VECTOR
        d.write(C.COMMON_Q_SELECT, 2, 1)
        d.write(C.COMMON_Q_MSIX, 2, bad)
        assert d.read(C.COMMON_Q_MSIX, 2) == C.NO_VECTOR


def test_4_1_5_3_1_no_interrupt_for_a_queue_on_no_vector() -> None:
    r = net_rig()
    d = r.driver
    d.write(C.COMMON_Q_SELECT, 2, 1)
    d.write(C.COMMON_Q_MSIX, 2, C.NO_VECTOR)
    r.tx.add([HDR + b"x"])
    r.tx.kick()
    r.device.process()
    assert r.tx.get_used() and r.irq.vectors == []
    # The other queue still interrupts on its vector.
    r.rx.add(in_=[2048])
    r.rx.kick()
    r.device.process()
    r.backend.rx.append(HDR + b"in")
    r.device.on_backend_readable()
    assert r.irq.vectors == [1]


def test_4_1_5_4_1_no_config_interrupt_on_no_vector() -> None:
    r = net_rig()
    r.driver.write(C.COMMON_MSIX, 2, C.NO_VECTOR)
    r.device.set_link(False)
    r.device.device_error("test")
    assert r.irq.vectors == []
    assert r.driver.read(C.ISR_OFFSET, 1) & C.ISR_CONFIG  # the change is still visible
