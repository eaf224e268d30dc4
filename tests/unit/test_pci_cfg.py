"""The VIRTIO_PCI_CAP_PCI_CFG window (harness.virtio.pcicfg): through it the driver reaches BAR0
exactly as directly (a whole driver probe and traffic through it, ISR read-to-clear, the BAR
path's own checks), a window that points nowhere is refused and counted, the cap's read-only
bytes stay; and end to end through libvfio-user's config space (VFU_CAP_FLAG_CALLBACK), with
the server's own PCI set-up."""

from __future__ import annotations

import struct
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.testing.mockdriver import MockDriver, NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio import pcicfg

HDR = bytes(12)


class WindowDriver(MockDriver):
    """The mock Linux driver, but every BAR0 access goes through the pci_cfg_data window (as
    firmware does when it cannot map the BAR): cap.bar/offset/length, then pci_cfg_data."""

    def _set(self, offset: int, width: int) -> None:
        w = self.device.pci_cfg
        w.write(pcicfg.BAR, memoryview(b"\0"))
        w.write(pcicfg.OFFSET, memoryview(offset.to_bytes(4, "little")))
        w.write(pcicfg.LENGTH, memoryview(width.to_bytes(4, "little")))

    def read(self, offset: int, width: int) -> int:
        self._set(offset, width)
        return int.from_bytes(self.device.pci_cfg.read(pcicfg.DATA, width), "little")

    def write(self, offset: int, width: int, value: int) -> None:
        self._set(offset, width)
        self.device.pci_cfg.write(pcicfg.DATA, memoryview(value.to_bytes(width, "little")))


def window_rig() -> tuple[NetRig, WindowDriver]:
    r = net_rig(init=False)
    d = WindowDriver(r.device, r.driver.mem)
    r.driver = d
    d.init()
    return r, d


def test_a_whole_probe_and_traffic_through_the_window() -> None:
    r, d = window_rig()
    assert d.status() & C.STATUS_DRIVER_OK and r.device.driver_ok
    r.tx.add([HDR + b"through the window"])
    r.tx.kick()  # the doorbell too: a 2-byte write at the notify offset
    r.device.process()
    assert r.backend.tx == [HDR + b"through the window"]  # the TAP takes the vnet header
    assert r.device.queues[1].stats.kicks == 1
    w = r.device.pci_cfg
    assert w.refused == 0 and r.device.bad_accesses == 0 and w.writes > 10 and w.reads > 10


def test_isr_read_to_clear_through_the_window() -> None:
    r, d = window_rig()
    r.device.set_link(False)
    assert d.read(C.ISR_OFFSET, 1) == C.ISR_CONFIG
    assert d.read(C.ISR_OFFSET, 1) == 0  # the window's read cleared it, like a direct one
    assert r.device.bar0_read(C.ISR_OFFSET, 1) == b"\0"


def test_device_config_reads_equal_direct_reads() -> None:
    r, d = window_rig()
    for off in range(r.device.device_config_len):
        for width in (1, 2, 4):
            if off % width == 0 and off + width <= r.device.device_config_len:
                direct = int.from_bytes(r.device.bar0_read(C.DEVICE_OFFSET + off, width),
                                        "little")
                assert d.read(C.DEVICE_OFFSET + off, width) == direct


def test_the_bar_paths_checks_still_apply() -> None:
    r, d = window_rig()
    bad = r.device.bad_accesses
    assert d.read(C.COMMON_DF, 1) == 0  # 1 byte of a 4-byte field: BAR0 refuses it
    d.write(C.COMMON_NUMQ, 2, 7)  # read-only field
    d.write(C.NOTIFY_OFFSET, 1, 0)  # a doorbell must be 2 or 4 bytes
    assert r.device.bad_accesses == bad + 3
    assert r.device.pci_cfg.refused == 0  # the window itself was fine each time


@pytest.mark.parametrize(("bar", "offset", "length", "why"), [
    (0, C.COMMON_STATUS, 0, "length 0"),
    (0, C.COMMON_STATUS, 3, "length 3"),
    (0, C.COMMON_DF, 8, "length 8"),
    (1, 0, 4, "BAR1 (MSI-X, QEMU's)"),
    (5, 0, 4, "BAR5 absent"),
    (0xFF, 0, 4, "reserved bar value"),
    (0, C.COMMON_Q_SELECT + 1, 2, "unaligned"),
    (0, C.COMMON_NUMQ + 1, 4, "unaligned 4"),
    (0, C.BAR0_SIZE - 2, 4, "past the end"),
    (0, C.BAR0_SIZE, 1, "at the end"),
    (0, 0xFFFFFFFF, 1, "far past the end"),
])  # fmt: skip
def test_a_window_pointing_nowhere_is_refused_and_counted(
    bar: int, offset: int, length: int, why: str
) -> None:
    r = net_rig()
    w = r.device.pci_cfg
    w.write(pcicfg.BAR, memoryview(bytes([bar])))
    w.write(pcicfg.OFFSET, memoryview(offset.to_bytes(4, "little")))
    w.write(pcicfg.LENGTH, memoryview(length.to_bytes(4, "little")))
    status, resets, bad = r.device.status, r.device.resets, r.device.bad_accesses
    w.write(pcicfg.DATA, memoryview(bytes(4)))  # would reset the device if it reached status
    assert w.read(pcicfg.DATA, 4) == bytes(4), why
    assert (r.device.status, r.device.resets) == (status, resets), why
    # A read of the closed window (length 0, the power-on value) is not counted.
    assert w.refused == (1 if length == 0 else 2) and w.reads == w.writes == 0, why
    assert r.device.bad_accesses == bad  # nothing reached BAR0


def test_the_closed_window_reads_zero_without_counting() -> None:
    # QEMU reads all of config space when it starts: that is not a driver error.
    w = net_rig().device.pci_cfg
    assert w.read(0, pcicfg.CAP_LEN)[pcicfg.DATA:] == bytes(4) and w.refused == 0


def test_read_only_cap_bytes_stay_and_are_counted() -> None:
    r = net_rig()
    w = r.device.pci_cfg
    before = w.read(0, pcicfg.CAP_LEN)
    w.write(0, memoryview(b"\xff" * 4))  # cap_vndr, cap_next, cap_len, cfg_type
    w.write(5, memoryview(b"\xff\xff\xff"))  # id, padding
    after = w.read(0, pcicfg.CAP_LEN)
    assert after[:4] == before[:4] == r.device.caps[-1][:4] and after[5:8] == before[5:8]
    assert w.refused == 2
    # A 4-byte write over bar/id/padding stores bar and leaves the rest (PCI read-only bits).
    w.write(4, memoryview(bytes([0, before[5], 0, 0])))
    assert w.refused == 2 and w.read(4, 1) == b"\0"


def test_reset_restores_the_power_on_cap_but_a_virtio_reset_does_not() -> None:
    r, d = window_rig()
    w = r.device.pci_cfg
    d.reset()  # status 0 through the window: the window stays as the driver set it
    assert w.read(pcicfg.LENGTH, 4) == (1).to_bytes(4, "little")
    w.reset()
    assert w.read(0, pcicfg.CAP_LEN) == r.device.caps[-1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, pcicfg.CAP_LEN + 4),
                          st.binary(min_size=1, max_size=8)), max_size=30))
def test_hostile_config_accesses_never_raise(ops: list[tuple[bool, int, bytes]]) -> None:
    r = net_rig()
    w = r.device.pci_cfg
    for is_write, off, data in ops:
        if is_write:
            w.write(off, memoryview(data))
        else:
            assert len(w.read(off, len(data))) == len(data)
    assert w.read(0, 4) == r.device.caps[-1][:4]


# ---- end to end: libvfio-user config space, the server's PCI set-up ---------------------------



def test_through_libvfio_user_config_space(sock_path: str) -> None:
    vfu = pytest.importorskip("harness.vfu")
    from harness.server.assembly import DeviceServer
    from harness.testing.vfu_client import CONFIG_REGION_INDEX, VfioUserClient, VfioUserError

    r = net_rig(init=False)
    ctx = vfu.VfuContext(sock_path)
    resets: list[object] = []
    server = types.SimpleNamespace(ctx=ctx, device=r.device, _on_dma_map=lambda reg: None,
                                   _on_dma_unmap=lambda reg: None, _on_reset=resets.append)
    DeviceServer._setup_pci(server)  # type: ignore[arg-type]

    def pump() -> None:
        if not ctx.attached:
            ctx.attach()
        else:
            ctx.run()

    try:
        with VfioUserClient(sock_path, pump=pump) as c:
            c.connect()

            def cfg(off: int, n: int) -> int:
                return int.from_bytes(c.region_read(CONFIG_REGION_INDEX, off, n), "little")

            pos, found = cfg(0x34, 1), []
            while pos:  # the capability list, as the guest walks it
                if cfg(pos, 1) == C.PCI_CAP_ID_VNDR:
                    found.append((cfg(pos + 3, 1), pos))
                pos = cfg(pos + 1, 1)
            types_ = [t for t, _ in found]
            assert types_ == [C.CapType.COMMON, C.CapType.NOTIFY, C.CapType.ISR,
                              C.CapType.DEVICE, C.CapType.PCI_CFG]
            cap = found[-1][1]
            assert cfg(cap + 2, 1) == pcicfg.CAP_LEN
            c.region_write(CONFIG_REGION_INDEX, cap + pcicfg.OFFSET,
                           struct.pack("<II", C.COMMON_NUMQ, 2))
            assert cfg(cap + pcicfg.DATA, 2) == r.device.num_queues
            c.region_write(CONFIG_REGION_INDEX, cap + pcicfg.OFFSET,
                           struct.pack("<II", C.COMMON_STATUS, 1))
            c.region_write(CONFIG_REGION_INDEX, cap + pcicfg.DATA, bytes([C.STATUS_ACKNOWLEDGE]))
            assert r.device.status == C.STATUS_ACKNOWLEDGE
            c.region_write(CONFIG_REGION_INDEX, cap + pcicfg.LENGTH, struct.pack("<I", 3))
            assert cfg(cap + pcicfg.DATA, 4) == 0 and r.device.pci_cfg.refused == 1
            # Outside any cap, config space is what it was: readable, writes refused.
            assert cfg(cap + pcicfg.CAP_LEN, 4) == 0
            with pytest.raises(VfioUserError):
                c.region_write(CONFIG_REGION_INDEX, 0xF0, b"\1\2\3\4")
            assert cfg(0, 4) == 0x10411AF4  # the header is still the library's
        assert ctx.stats()["callback_failures"] == 0
    finally:
        ctx.close()
