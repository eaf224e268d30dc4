"""The control queue's commands (harness.virtio.ctrl): each command, and hostile ones answered
with ERR without reading past the bytes given."""

from __future__ import annotations

import struct

import pytest

from harness.testing.mockdriver import NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio import ctrl
from harness.virtio.ctrl import ERR, OK, ControlState
from harness.virtio.net import CTRL_FEATURES, DEFAULT_FEATURES

MAC = bytes.fromhex("525400123456")
ALL = sum(1 << b for b in (ctrl.NET_F_CTRL_VQ, ctrl.NET_F_CTRL_RX, ctrl.NET_F_CTRL_RX_EXTRA,
                           ctrl.NET_F_GUEST_ANNOUNCE, ctrl.NET_F_MQ, ctrl.NET_F_CTRL_MAC_ADDR))
OTHER = bytes.fromhex("525400aaaaaa")
MCAST = bytes.fromhex("01005e000001")


def table(uni: list[bytes], multi: list[bytes]) -> bytes:
    return (struct.pack("<I", len(uni)) + b"".join(uni)
            + struct.pack("<I", len(multi)) + b"".join(multi))


def test_rx_modes_and_the_filter() -> None:
    s = ControlState(MAC)
    assert s.accepts(OTHER)  # promiscuous until the driver says otherwise
    assert s.handle(bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC, 0]), ALL) == OK
    assert s.accepts(MAC) and not s.accepts(OTHER) and s.accepts(b"\xff" * 6)
    assert not s.accepts(MCAST)
    assert s.handle(bytes([ctrl.CLASS_RX, ctrl.RX_ALLMULTI, 1]), ALL) == OK
    assert s.accepts(MCAST)
    assert s.handle(bytes([ctrl.CLASS_RX, ctrl.RX_NOBCAST, 1]), ALL) == OK
    assert not s.accepts(b"\xff" * 6)
    assert s.handle(bytes([ctrl.CLASS_RX, ctrl.RX_NOUNI, 1]), ALL) == OK
    assert not s.accepts(MAC)


def test_mac_table_and_address() -> None:
    s = ControlState(MAC)
    s.handle(bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC, 0]), ALL)
    assert s.handle(bytes([ctrl.CLASS_MAC, ctrl.MAC_TABLE_SET]) + table([OTHER], [MCAST]),
                    ALL) == OK
    assert s.accepts(OTHER) and s.accepts(MCAST) and not s.accepts(bytes.fromhex("01005e000002"))
    assert s.handle(bytes([ctrl.CLASS_MAC, ctrl.MAC_ADDR_SET]) + OTHER[::-1], ALL) == OK
    assert s.mac == OTHER[::-1] and s.accepts(OTHER[::-1])
    big = [bytes([2, 0, 0, 0, k >> 8, k & 0xFF]) for k in range(65)]
    assert s.handle(bytes([ctrl.CLASS_MAC, ctrl.MAC_TABLE_SET]) + table(big, []), ALL) == OK
    assert s.uni_overflow and s.accepts(bytes.fromhex("02000000ffff"))


def test_mq_pairs_and_announce() -> None:
    s = ControlState(MAC, max_pairs=4)
    assert s.handle(bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 3), ALL) == OK
    assert s.pairs == 3
    s.announce_pending = True  # an ack answers an announcement (ERR without one: test_announce)
    assert s.handle(bytes([ctrl.CLASS_ANNOUNCE, ctrl.ANNOUNCE_ACK]), ALL) == OK
    assert s.announce_acks == 1 and not s.announce_pending


@pytest.mark.parametrize(("command", "feats", "why"), [
    (bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC, 0]), 0, "CTRL_VQ not negotiated"),
    (bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC, 0]), 1 << ctrl.NET_F_CTRL_VQ, "CTRL_RX not"),
    (bytes([ctrl.CLASS_RX, ctrl.RX_NOUNI, 1]),
     (1 << ctrl.NET_F_CTRL_VQ) | (1 << ctrl.NET_F_CTRL_RX), "CTRL_RX_EXTRA not"),
    (b"", ALL, "no class"),
    (b"\x00", ALL, "no class"),
    (bytes([ctrl.CLASS_RX, 9, 1]), ALL, "unknown"),
    (bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC]), ALL, "0 bytes of data"),
    (bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC, 1, 1]), ALL, "2 bytes of data"),
    (bytes([ctrl.CLASS_MAC, ctrl.MAC_TABLE_SET]) + struct.pack("<I", 0xFFFFFFFF), ALL,
     "unicast table of 4294967295 entries in 0 bytes"),
    (bytes([ctrl.CLASS_MAC, ctrl.MAC_TABLE_SET]) + struct.pack("<I", 0), ALL,
     "multicast table has no entry count"),
    (bytes([ctrl.CLASS_MAC, ctrl.MAC_TABLE_SET]) + table([], []) + b"x", ALL, "1 bytes after"),
    (bytes([ctrl.CLASS_MAC, ctrl.MAC_ADDR_SET]) + MAC[:5], ALL, "MAC_ADDR_SET with 5 bytes"),
    (bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 0), ALL, "outside 1..1"),
    (bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 2), ALL, "outside 1..1"),
    (bytes([ctrl.CLASS_MQ, ctrl.MQ_VQ_PAIRS_SET, 1]), ALL, "1 bytes of data"),
    (bytes([ctrl.CLASS_VLAN, 0, 1, 0]), ALL, "not supported"),
])  # fmt: skip
def test_bad_commands_are_refused(command: bytes, feats: int, why: str) -> None:
    s = ControlState(MAC)
    before = s.as_dict()
    assert s.handle(command, feats) == ERR
    assert why in s.last_error and s.errors == 1
    after = s.as_dict()
    counters = ("commands", "errors", "last_error")
    assert {k: v for k, v in after.items() if k not in counters} == \
        {k: v for k, v in before.items() if k not in counters}


# ---- the control virtqueue in the device (driver-side mock) ---------------------------------

HDR = bytes(12)


def ctrl_rig() -> NetRig:
    return net_rig(features=DEFAULT_FEATURES | CTRL_FEATURES)


def command(r: NetRig, cmd: bytes) -> int:
    q = r.driver.queues[2]
    head = q.add([cmd[:2], cmd[2:]] if len(cmd) > 2 else [cmd], in_=[1])
    q.kick()
    r.device.process()
    [(h, n)] = q.get_used()
    assert h == head and n == 1
    return q.written(head, 1)[0]


def rx_frames(r: NetRig, dsts: list[bytes]) -> list[bytes]:
    for _ in range(len(dsts)):
        r.rx.add(in_=[2048])
    r.rx.kick()
    r.device.process()
    r.backend.rx.extend(HDR + d + MAC + b"\x08\x00" + bytes(50) for d in dsts)
    r.device.on_backend_readable()
    return [r.rx.written(h, n)[12:18] for h, n in r.rx.get_used()]


def test_the_device_has_a_control_queue_only_when_it_offers_ctrl_vq() -> None:
    assert ctrl_rig().device.num_queues == 3
    assert net_rig().device.num_queues == 2


def test_commands_through_the_queue_set_the_receive_filter() -> None:
    r = ctrl_rig()
    irqs = len(r.irq.vectors)
    assert command(r, bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC, 0])) == OK
    assert len(r.irq.vectors) > irqs  # the ack is signalled
    assert command(r, bytes([ctrl.CLASS_MAC, ctrl.MAC_TABLE_SET]) + table([], [MCAST])) == OK
    assert command(r, bytes([ctrl.CLASS_VLAN, 0, 0, 0])) == ERR
    got = rx_frames(r, [MAC, OTHER, MCAST, b"\xff" * 6, bytes.fromhex("01005e000009")])
    assert got == [MAC, MCAST, b"\xff" * 6]
    assert r.device.filtered == 2 and not r.device.status & C.STATUS_NEEDS_RESET
    stats = r.device.stats()["ctrl"]
    assert isinstance(stats, dict) and stats["errors"] == 1
    r.driver.reset()  # back to promiscuous; the counters stay
    r.driver.init()
    assert rx_frames(r, [OTHER]) == [OTHER]
    assert r.device.control.commands == 3 and r.device.control.rx["promisc"]


@pytest.mark.parametrize("case", ["no_ack_room", "one_byte_command"])
def test_malformed_control_chains_need_reset(case: str) -> None:
    r = ctrl_rig()
    q = r.driver.queues[2]
    if case == "no_ack_room":
        q.add([bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC, 0])])
    else:
        q.add([b"\x00"], in_=[1])
    q.kick()
    r.device.process()
    assert r.device.status & C.STATUS_NEEDS_RESET
    assert q.get_used() == []


@pytest.mark.parametrize("event_idx", [True, False])
def test_every_command_gets_its_kick_and_answer(event_idx: bool) -> None:
    # The driver kicks only when the device asked (avail_event / NO_NOTIFY): after each answer
    # the device must ask again, or the second command is never seen (Linux spins on it).
    feats = DEFAULT_FEATURES | CTRL_FEATURES
    if not event_idx:
        feats &= ~(1 << C.F_EVENT_IDX)
    r = net_rig(features=feats)
    q = r.driver.queues[2]
    for k in range(3):
        head = q.add([bytes([ctrl.CLASS_RX, ctrl.RX_PROMISC]), bytes([k & 1])], in_=[1])
        assert q.kick_if_needed(), f"command {k}: the device did not ask for a kick"
        r.device.process()
        assert q.get_used() == [(head, 1)] and q.written(head, 1) == bytes([OK])
