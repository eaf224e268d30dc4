"""The device process's command line (harness.server.cli): options, errors, signals, entry."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.server import main, switches
from harness.server.assembly import ServerConfig
from harness.server.cli import parse_args, stop_on_signals
from harness.server.loop import DeviceLoop
from harness.testing.mockdriver import net_rig
from harness.testing.serverfakes import FakeEndpoint

REPO = Path(__file__).resolve().parents[2]
#: The signals that must stop the device process cleanly (spelled out, not STOP_SIGNALS).
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@pytest.fixture(autouse=True)
def no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should main() get past its options, fail at once: never a TAP or netns switch here."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("main() went past option parsing")

    monkeypatch.setattr("harness.server.cli.DeviceServer", refuse)
    monkeypatch.setattr("harness.server.cli.netns_mod.enter", refuse)


def test_runner_options_parse(tmp_path: Path) -> None:
    # What harness/runner.py passes (see _run), every option at once.
    cfg, level = parse_args([
        "--socket", str(tmp_path / "device.sock"), "--netns", "hns-1",
        "--map-ops", "bounce", "--control", str(tmp_path / "control.sock"),
        "--access-platform", "--faults", "mapping-error=0.01,seed=7", "--offloads",
        "--stats", str(tmp_path / "device-stats.json"),
    ])
    assert cfg == ServerConfig(
        socket=tmp_path / "device.sock", netns="hns-1", map_ops="bounce",
        control=tmp_path / "control.sock", access_platform=True,
        faults="mapping-error=0.01,seed=7", offloads=True,
        stats=tmp_path / "device-stats.json")
    assert level == "INFO"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--socket"],
        ["--socket", "/tmp/x.sock", "--queue-size", "100"],
        ["--socket", "/tmp/x.sock", "--queue-size", "many"],
        ["--socket", "/tmp/x.sock", "--mac", "52:54:00"],
        ["--socket", "/tmp/x.sock", "--map-ops", "teleport"],
        ["--socket", "/tmp/x.sock", "--faults", "gremlins=1"],
        ["--socket", "/tmp/x.sock", "--log-level", "loud"],
        ["--socket", "/tmp/x.sock", "--host-address", "198.18.0"],
        ["--socket", "/tmp/x.sock", "--prefixlen", "33"],
        ["--socket", "/tmp/x.sock", "--host-address", "fd00::1", "--prefixlen", "129"],
        ["--socket", "/tmp/x.sock", "--bogus"],
    ],
)
def test_bad_input_is_a_one_line_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_python_dash_m_entry_point() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "harness.server", "--help"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "--socket" in ok.stdout and "--control" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "harness.server", "--socket", "x",
                          "--queue-size", "3"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1].startswith("harness-server: error: --queue-size")


@pytest.mark.parametrize("name", switches.NAMES)
def test_a_mistyped_switch_is_one_error_line_before_anything_starts(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Every HARNESS_* switch is read before the device is built: a bad value is one logged
    line naming it and exit 1, not a traceback from wherever it is first read."""
    from harness.server import cli

    def not_reached(cfg: ServerConfig) -> None:
        raise OSError("the device was built before its switches were read")

    monkeypatch.setattr(cli, "DeviceServer", not_reached)  # and a mutant fails, not hangs
    monkeypatch.setenv(name, "bogus")
    with caplog.at_level(logging.ERROR):
        assert main(["--socket", str(tmp_path / "s")]) == 1
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage().startswith(f"could not start the device: {name}='bogus'")
    assert record.exc_info is None


@pytest.fixture
def loop() -> Iterator[DeviceLoop]:
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:  # a signal the code under test does not handle is then a failure,
        signal.signal(s, signal.SIG_IGN)  # not the end of pytest
    nr = net_rig()
    endpoint = FakeEndpoint()
    lp = DeviceLoop(endpoint, nr.device, _NoLedger(), nr.backend)
    yield lp
    for s, handler in saved.items():
        signal.signal(s, handler)
    lp.close()
    endpoint.close()


class _NoLedger:
    def housekeeping(self) -> None:
        pass

    def check_leaks(self, when: str) -> int:
        return 0


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_stop_signals_only_ask_the_loop_to_stop(loop: DeviceLoop, signum: int) -> None:
    stop_on_signals(loop)
    assert not loop.stop
    os.kill(os.getpid(), signum)  # the handler runs before kill() returns to Python code
    assert loop.stop
