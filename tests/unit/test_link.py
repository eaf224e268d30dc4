"""Link state (VIRTIO_NET_F_STATUS): the config status bit, config_generation and the config
interrupt, what a link-down device does with frames, the `link` control command and
`harness link up|down`."""

from __future__ import annotations

import json
import os
import selectors
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import inspect
from harness.cli import main
from harness.server.control import ControlServer, device_commands
from harness.session import RUN_FILE
from harness.testing.mockdriver import NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES

HDR = bytes(12)
STATUS = C.DEVICE_OFFSET + 6
CONFIG_VECTOR = 0  # MockDriver.init puts msix_config on vector 0, the queues on 1 and 2


def link_bit(r: NetRig) -> int:
    return r.driver.read(STATUS, 2) & C.NET_S_LINK_UP


def generation(r: NetRig) -> int:
    return r.driver.read(C.COMMON_CFGGENERATION, 1)


def qstat(r: NetRig, queue: str, key: str) -> int:
    per = r.device.stats()[queue]
    assert isinstance(per, dict)
    return int(per[key])


# ---- the device ---------------------------------------------------------------------------


def test_status_feature_is_offered_and_negotiated() -> None:
    r = net_rig()
    assert DEFAULT_FEATURES >> C.NET_F_STATUS & 1
    assert r.driver.device_features() >> C.NET_F_STATUS & 1
    assert r.device.has_feature(C.NET_F_STATUS)
    assert link_bit(r) == C.NET_S_LINK_UP  # the link starts up


def test_toggling_sets_the_bit_bumps_generation_one_interrupt_each() -> None:
    r = net_rig()
    assert r.driver.read(C.COMMON_MSIX, 2) == CONFIG_VECTOR
    r.irq.vectors.clear()
    gen = generation(r)
    for i, up in enumerate([False, True, False, True], start=1):
        assert r.device.set_link(up) is True
        assert link_bit(r) == (C.NET_S_LINK_UP if up else 0)
        assert generation(r) == (gen + i) & 0xFF
        assert r.irq.vectors == [CONFIG_VECTOR] * i  # exactly one per change
        assert r.driver.read(C.ISR_OFFSET, 1) == C.ISR_CONFIG
    assert r.device.stats()["link_changes"] == 4


def test_no_change_no_interrupt_no_generation() -> None:
    r = net_rig()
    r.irq.vectors.clear()
    gen = generation(r)
    assert r.device.set_link(True) is False  # already up
    assert r.irq.vectors == [] and generation(r) == gen
    assert r.driver.read(C.ISR_OFFSET, 1) == 0
    r.device.set_link(False)
    assert r.device.set_link(False) is False
    assert r.irq.vectors == [CONFIG_VECTOR] and generation(r) == (gen + 1) & 0xFF


def test_before_driver_ok_generation_changes_but_no_interrupt() -> None:
    r = net_rig(init=False)
    gen = generation(r)
    assert r.device.set_link(False)
    assert generation(r) == (gen + 1) & 0xFF and r.irq.vectors == []
    r.driver.init()
    assert link_bit(r) == 0  # the driver reads the field when it comes up


def test_link_survives_a_reset() -> None:
    r = net_rig()
    r.device.set_link(False)
    r.driver.reset()
    r.driver.init()
    assert link_bit(r) == 0 and r.device.stats()["link_up"] is False


def test_without_status_feature_no_notification() -> None:
    r = net_rig(features=DEFAULT_FEATURES & ~(1 << C.NET_F_STATUS))
    r.irq.vectors.clear()
    gen = generation(r)
    assert r.device.set_link(False)
    assert r.irq.vectors == [] and generation(r) == gen


def test_link_down_rx_frames_are_dropped_not_delivered() -> None:
    r = net_rig()
    for _ in range(4):
        r.rx.add(in_=[2048])
    r.rx.kick()
    r.device.process()
    r.device.set_link(False)
    r.irq.vectors.clear()
    r.backend.rx.extend([HDR + b"a" * 60, HDR + b"b" * 1400])
    assert r.device.rx_wanted()  # the backend is drained while the link is down
    r.device.on_backend_readable()
    assert not r.backend.rx and r.rx.get_used() == [] and r.irq.vectors == []
    assert qstat(r, "rx0", "drops") == 2 and qstat(r, "rx0", "packets") == 0
    assert r.device.stats()["link_drops"] == 2
    # Link up again: the next frame lands in the buffers posted all along.
    r.device.set_link(True)
    r.backend.rx.append(HDR + b"c" * 60)
    r.device.on_backend_readable()
    ((head, n),) = r.rx.get_used()
    assert n == 72 and r.rx.written(head, n)[12:] == b"c" * 60
    assert qstat(r, "rx0", "packets") == 1


def test_link_down_drains_even_without_rx_buffers() -> None:
    r = net_rig()
    r.device.on_backend_readable()  # no buffers posted: starved
    assert not r.device.rx_wanted()
    r.device.set_link(False)
    assert r.device.rx_wanted()
    r.backend.rx.append(HDR + b"x" * 100)
    r.device.on_backend_readable()
    assert not r.backend.rx and r.device.stats()["link_drops"] == 1
    r.bus_master[0] = False  # no DMA allowed: the device leaves the backend alone
    assert not r.device.rx_wanted()


def test_link_down_tx_is_completed_and_dropped() -> None:
    r = net_rig()
    r.device.set_link(False)
    r.tx.add([HDR + b"lost" * 10])
    r.tx.add([HDR + b"gone" * 10])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == []
    assert sorted(n for _, n in r.tx.get_used()) == [0, 0]  # no TX timeout in the guest
    assert qstat(r, "tx0", "drops") == 2 and qstat(r, "tx0", "packets") == 0
    assert r.device.stats()["link_drops"] == 2
    r.device.set_link(True)
    r.tx.add([HDR + b"sent"])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [HDR + b"sent"]


# ---- the control command and the CLI --------------------------------------------------------


class Served:
    """A control server with the device's real command table, served by a thread."""

    def __init__(self, path: Path, r: NetRig) -> None:
        self.path = path
        self.server = ControlServer.listen(path, device_commands(
            stats=lambda: {"device": r.device.stats()}, stop=lambda: None,
            dump_queue=r.device.dump_queue, link=r.device.set_link))
        self.sel = selectors.DefaultSelector()
        self.server.register(self.sel)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._done.is_set():
            for key, mask in self.sel.select(timeout=0.01):
                key.data(mask)

    def ask(self, cmd: str, **args: object) -> dict[str, Any]:
        return inspect.request(self.path, cmd, timeout=5.0, **args)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.server.close()
        self.sel.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NetRig, Served]]:
    r = net_rig()
    s = Served(tmp_path / "net0-control.sock", r)
    yield r, s
    s.close()


def test_link_command_sets_the_state(served: tuple[NetRig, Served]) -> None:
    r, s = served
    assert s.ask("link", up=False) == {"ok": True, "up": False, "changed": True}
    assert link_bit(r) == 0
    assert s.ask("link", up=False) == {"ok": True, "up": False, "changed": False}
    assert s.ask("stats")["stats"]["device"]["link_up"] is False
    assert s.ask("link", up=True) == {"ok": True, "up": True, "changed": True}
    assert link_bit(r) == C.NET_S_LINK_UP


@pytest.mark.parametrize(("args", "error"), [
    ({}, 'link needs "up"'),
    ({"up": 1}, '"up" must be a boolean, not number'),
    ({"up": "down"}, '"up" must be a boolean, not string'),
    ({"up": None}, '"up" must be a boolean, not null'),
])
def test_link_command_refuses_non_booleans(served: tuple[NetRig, Served], args: dict[str, Any],
                                           error: str) -> None:
    r, s = served
    reply = s.ask("link", **args)
    assert reply["ok"] is False and reply["error"].startswith(error), reply
    assert r.device.link_up and r.device.link_changes == 0


def test_no_link_command_without_a_setter() -> None:
    assert "link" not in device_commands(stats=dict, stop=lambda: None)


def write_run(run_dir: Path, s: Served) -> None:
    run_dir.mkdir(exist_ok=True)
    info = {"pid": os.getpid(), "run_dir": str(run_dir), "qmp": str(run_dir / "qmp.sock"),
            "control": [str(s.path)], "devices": ["net0"],
            "console_socket": "", "console_log": ""}
    (run_dir / RUN_FILE).write_text(json.dumps(info))


def head(stats_text: str) -> str:
    """The device lines of a `harness stats` rendering (before the queue table)."""
    return stats_text.split("\nqueue ")[0]


def test_harness_link_down_and_up(served: tuple[NetRig, Served], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    r, s = served
    run = str(tmp_path / "run")
    write_run(tmp_path / "run", s)
    assert main(["link", "down", "--run-dir", run]) == 0
    assert capsys.readouterr().out == "net0: link down\n"
    assert not r.device.link_up
    assert main(["link", "down", "--run-dir", run]) == 0
    assert capsys.readouterr().out == "net0: link down (it already was)\n"
    assert main(["stats", "--run-dir", run]) == 0
    assert "LINK DOWN" in head(capsys.readouterr().out)
    assert main(["link", "up", "--json", "--run-dir", run]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "up": True, "changed": True}
    assert r.device.link_up
    assert main(["stats", "--run-dir", run]) == 0
    assert "link up" in head(capsys.readouterr().out)
    assert main(["link", "up", "--device", "net3", "--run-dir", run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness link: no device 'net3'") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["link"], ["link", "sideways"], ["link", "1"]])
def test_link_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_stats_rendering_without_link_key_is_unchanged() -> None:
    text = inspect.render_stats({"stats": {"device": {"status": 15}}})
    assert "link" not in head(text).lower()

