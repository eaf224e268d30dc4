"""Control-queue device MUSTs of virtio 1.3 5.1.6.5.2.1 (MAC address filtering) checked through
BAR0 and the control virtqueue with the driver mock (docs/CONFORMANCE.md maps them here)."""

from __future__ import annotations

from harness.testing.mockdriver import NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio import ctrl
from harness.virtio.net import CTRL_FEATURES, DEFAULT_FEATURES

MAC = bytes.fromhex("525400123456")
NEW = bytes.fromhex("02aabbccddee")
HDR = bytes(12)


def command(r: NetRig, cmd: bytes) -> int:
    q = r.driver.queues[2]
    head = q.add([cmd[:2], cmd[2:]], in_=[1])
    q.kick()
    r.device.process()
    [(h, n)] = q.get_used()
    assert h == head and n == 1
    return q.written(head, 1)[0]


def config_mac(r: NetRig) -> bytes:
    return r.device.bar0_read(C.DEVICE_OFFSET, 8)[:6]  # 8-byte read: as Linux reads it


def test_5_1_6_5_2_1_mac_addr_set_updates_the_config_mac_before_it_is_consumed() -> None:
    r = net_rig(features=DEFAULT_FEATURES | CTRL_FEATURES)
    assert config_mac(r) == MAC
    gen = r.device.config_generation
    assert command(r, bytes([ctrl.CLASS_MAC, ctrl.MAC_ADDR_SET]) + NEW) == ctrl.OK
    # Changed since the driver read it: a new generation (4.1.4.3.1), no config interrupt (the
    # driver asked for it).
    assert config_mac(r) == NEW and r.device.config_generation != gen
    r.driver.init()  # a device reset brings the device's own address back
    assert config_mac(r) == MAC


def test_5_1_6_5_2_1_the_mac_table_is_empty_on_reset_and_set_before_the_ack() -> None:
    r = net_rig(features=DEFAULT_FEATURES | CTRL_FEATURES)
    assert command(r, bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC, 0])) == ctrl.OK
    table = b"\x01\x00\x00\x00" + NEW + b"\x00\x00\x00\x00"
    assert command(r, bytes([ctrl.CLASS_MAC, ctrl.MAC_TABLE_SET]) + table) == ctrl.OK
    assert r.device.control.uni == [NEW]  # in place when the ack was returned
    r.driver.init()
    assert r.device.control.uni == [] and r.device.control.multi == []
    assert not r.device.control.uni_overflow and not r.device.control.multi_overflow
