"""VIRTIO_NET_F_GUEST_ANNOUNCE (virtio 1.3 5.1.6.5.4): the device sets VIRTIO_NET_S_ANNOUNCE
and raises the config interrupt; the driver's ANNOUNCE_ACK clears the bit. Driven through
BAR0 and the control virtqueue with the driver mock; the control-socket command too."""

from __future__ import annotations

import json
import os
import selectors
import struct
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from harness.cli import main
from harness.server.control import CommandError, ControlServer, Request, device_commands
from harness.session import RUN_FILE
from harness.testing.mockdriver import NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio import ctrl
from harness.virtio.features import parse
from harness.virtio.net import CTRL_FEATURES, DEFAULT_FEATURES

ANNOUNCE = DEFAULT_FEATURES | CTRL_FEATURES | (1 << C.NET_F_GUEST_ANNOUNCE)
ACK = bytes([ctrl.CLASS_ANNOUNCE, ctrl.ANNOUNCE_ACK])
CONFIG_VECTOR = 0  # MockDriver.init writes msix_config 0


def status(r: NetRig) -> int:
    return int(struct.unpack("<H", r.device.bar0_read(C.DEVICE_OFFSET + 6, 2))[0])


def command(r: NetRig, cmd: bytes) -> int:
    q = r.driver.queues[2]
    head = q.add([cmd[:2], cmd[2:]] if len(cmd) > 2 else [cmd], in_=[1])
    q.kick()
    r.device.process()
    [(h, n)] = q.get_used()
    assert h == head and n == 1
    return q.written(head, 1)[0]


def test_guest_announce_follows_ctrl_vq_and_needs_it() -> None:
    assert "guest_announce" in parse("ctrl_vq=on").on
    assert "guest_announce" in parse("mq=2").on
    assert "guest_announce" not in parse("ctrl_vq=on,guest_announce=off").on
    assert "guest_announce" not in parse("").on
    with pytest.raises(ValueError, match="needs ctrl_vq"):
        parse("guest_announce=on")
    with pytest.raises(ValueError, match="ctrl_vq"):
        net_rig(features=DEFAULT_FEATURES | (1 << C.NET_F_GUEST_ANNOUNCE), init=False)


def test_announce_sets_the_bit_raises_the_config_interrupt_and_the_ack_clears_it() -> None:
    r = net_rig(features=ANNOUNCE)
    assert status(r) == C.NET_S_LINK_UP
    gen, irqs = r.device.config_generation, r.irq.count(CONFIG_VECTOR)
    assert r.device.announce() == 1
    assert status(r) == C.NET_S_LINK_UP | C.NET_S_ANNOUNCE
    assert r.irq.count(CONFIG_VECTOR) == irqs + 1 and r.device.config_generation != gen
    assert r.device.bar0_read(C.ISR_OFFSET, 1)[0] & C.ISR_CONFIG

    assert command(r, ACK) == ctrl.OK  # Linux: netdev_notify_peers, then the ack
    assert status(r) == C.NET_S_LINK_UP
    st = r.device.control.as_dict()
    assert (st["announces"], st["announce_acks"], st["announce_pending"]) == (1, 1, False)


def test_an_ack_with_nothing_pending_or_with_data_is_refused() -> None:
    r = net_rig(features=ANNOUNCE)
    assert command(r, ACK) == ctrl.ERR
    r.device.announce()
    assert command(r, ACK + b"\x00") == ctrl.ERR
    assert status(r) & C.NET_S_ANNOUNCE  # still pending: a bad ack does not clear it
    assert command(r, ACK) == ctrl.OK
    assert r.device.control.errors == 2 and not r.device.status & C.STATUS_NEEDS_RESET


def test_an_ack_without_guest_announce_negotiated_is_refused() -> None:
    r = net_rig(features=ANNOUNCE, driver_features=ANNOUNCE & ~(1 << C.NET_F_GUEST_ANNOUNCE))
    r.device.control.announce_pending = True  # even with the bit (wrongly) set
    assert command(r, ACK) == ctrl.ERR
    assert "GUEST_ANNOUNCE not negotiated" in r.device.control.last_error


@pytest.mark.parametrize(("features", "driver_features", "init", "why"), [
    (DEFAULT_FEATURES | CTRL_FEATURES, None, True, "does not offer"),
    (ANNOUNCE, ANNOUNCE & ~(1 << C.NET_F_GUEST_ANNOUNCE), True, "has not negotiated"),
    (ANNOUNCE, None, False, "not running"),
    (ANNOUNCE, ANNOUNCE & ~(1 << C.NET_F_STATUS), True, "STATUS"),
])
def test_announce_when_the_driver_cannot_see_it_is_a_one_line_error(
        features: int, driver_features: int | None, init: bool, why: str) -> None:
    r = net_rig(features=features, driver_features=driver_features, init=init)
    with pytest.raises(ValueError, match=why) as exc:
        r.device.announce()
    assert "\n" not in str(exc.value)
    assert r.device.control.announces == 0 and not status(r) & C.NET_S_ANNOUNCE


def test_a_device_reset_clears_a_pending_announcement() -> None:
    r = net_rig(features=ANNOUNCE)
    r.device.announce()
    r.driver.init()
    assert status(r) == C.NET_S_LINK_UP
    assert r.device.control.announces == 1  # the counter stays, like the others


def test_the_announce_control_command() -> None:
    r = net_rig(features=ANNOUNCE)
    table = device_commands(stats=dict, stop=lambda: None, announce=r.device.announce)
    server = cast(ControlServer, None)  # the handler does not use it
    reply: dict[str, Any] = table["announce"](server, Request("announce", {"cmd": "announce"}))
    assert reply == {"announces": 1} and status(r) & C.NET_S_ANNOUNCE
    r.driver.reset()
    with pytest.raises(CommandError, match="not running"):
        table["announce"](server, Request("announce", {"cmd": "announce"}))
    assert "announce" not in device_commands(stats=dict, stop=lambda: None)


@pytest.mark.parametrize("offered", [True, False])
def test_harness_announce_cli(offered: bool, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    r = net_rig(features=ANNOUNCE if offered else DEFAULT_FEATURES | CTRL_FEATURES)
    sock = tmp_path / "net0-control.sock"
    server = ControlServer.listen(sock, device_commands(stats=dict, stop=lambda: None,
                                                       announce=r.device.announce))
    sel = selectors.DefaultSelector()
    server.register(sel)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            for key, mask in sel.select(timeout=0.01):
                key.data(mask)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    (tmp_path / RUN_FILE).write_text(json.dumps({
        "pid": os.getpid(), "run_dir": str(tmp_path), "qmp": "", "devices": ["net0"],
        "control": [str(sock)], "console_socket": "", "console_log": ""}))
    try:
        code = main(["announce", "--run-dir", str(tmp_path)])
    finally:
        done.set()
        t.join(5)
        server.close()
        sel.close()
    out, err = capsys.readouterr()
    if offered:
        assert (code, out, err) == (0, "net0: announce requested (1 so far)\n", "")
        assert status(r) & C.NET_S_ANNOUNCE
    else:
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith("harness announce: ") and "GUEST_ANNOUNCE" in err
