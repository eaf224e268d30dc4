"""Device introspection, the reading side: the 80-column renderings of `stats` and `dump-queue`
replies (also of odd and huge ones) and the `harness stats` / `harness dump-queue` commands, on
tests/unit/test_inspect.py's box (a net device over mock memory with a real control server)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import inspect
from harness.cli import main
from harness.inspect_dump import render_dump
from harness.session import RUN_FILE
from tests.unit import test_inspect
from tests.unit.test_inspect import HDR, INDIRECT, Box, _loop

# The box fixtures are test_inspect's: bound here, pytest finds them under these names.
box = test_inspect.box
box_factory = test_inspect.box_factory


# ---- the renderings --------------------------------------------------------------------------


def assert_fits(text: str) -> None:
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, too_long


def huge(value: object) -> object:
    """Every integer counter replaced by something far wider than its column."""
    if isinstance(value, dict):
        return {k: huge(v) for k, v in value.items()}
    if isinstance(value, list):
        return [huge(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return 10**18 + value
    if isinstance(value, str):
        return value * 40
    return value


def test_stats_table_fits_80_columns(box: Box) -> None:
    box.tx.add([HDR + b"x" * 60])
    box.tx.kick()
    box.device.process()
    reply = box.stats()
    text = inspect.render_stats(reply)
    assert_fits(text)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("queue"))
    assert header.split() == ["queue", "avail", "used", "kicks", "irqs", "suppressed",
                              "chains", "bytes", "drops", "errors"]
    assert next(line for line in lines if line.startswith("tx0")).split()[:7] == [
        "tx0", "1", "1", "1", "1", "0", "1"]
    assert any(line.startswith("map ops") for line in lines)
    assert any(line.startswith("iova") for line in lines)
    assert "rx pool  keep, 0 chains held" in lines
    wide = inspect.render_stats(huge(reply)).splitlines()  # type: ignore[arg-type]
    assert_fits("\n".join(wide))
    rows = [line for line in wide if line.split()[0] in ("rx0", "tx0", "total")]
    # Counters far wider than their columns are shortened (1.0E), not cut off.
    assert len(rows) == 3 and not any(row.endswith("...") for row in rows), rows
    assert [len(row.split()) for row in rows] == [10, 10, 8], rows


def test_dump_rendering_fits_80_columns(box_factory: Callable[..., Box]) -> None:
    b = box_factory(queue_size=256, features=INDIRECT)
    for _ in range(200):
        b.rx.add(in_=[1536])
    b.tx.add_indirect([HDR, b"x" * 100])
    text = render_dump(b.dump(0))
    assert_fits(text)
    assert "in flight: 200 chains (200 available)" in text
    assert "more chains (--json has them all)" in text
    assert_fits(render_dump(b.dump(1)))
    _loop(b.tx, b.driver.mem)
    garbage = b.dump(1)
    assert_fits(render_dump(garbage))
    assert_fits(render_dump(huge(garbage)))  # type: ignore[arg-type]


@pytest.mark.parametrize("reply", [{}, {"stats": 5}, {"stats": {"device": {"rx0": [1]}}},
                                   {"stats": {"device": {"tx0": {"kicks": "many"}}}}])
def test_stats_rendering_survives_odd_replies(reply: dict[str, Any]) -> None:
    assert_fits(inspect.render_stats(reply))


@pytest.mark.parametrize("dump", [{}, {"descriptors": [1, None, {"addr": "x"}]},
                                  {"size": 8, "avail": {"idx": 3, "ring": [1]}, "used": 7},
                                  {"in_flight": [None, {"descriptors": 5}], "avail": {}}])
def test_dump_rendering_survives_odd_replies(dump: dict[str, Any]) -> None:
    assert_fits(render_dump(dump))


# ---- the commands ------------------------------------------------------------------------


def write_run(run_dir: Path, box: Box) -> None:
    run_dir.mkdir(exist_ok=True)
    info = {"pid": os.getpid(), "run_dir": str(run_dir), "qmp": str(run_dir / "qmp.sock"),
            "control": [str(box.served.path)], "devices": ["net0"],
            "console_socket": "", "console_log": ""}
    (run_dir / RUN_FILE).write_text(json.dumps(info))


def test_harness_stats_and_dump_queue(box: Box, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "run", box)
    box.tx.add([HDR + b"y" * 80])
    assert main(["stats", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert_fits(out)
    assert out.splitlines()[0].startswith("net0") and "tx0" in out
    assert main(["dump-queue", "1", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert_fits(out)
    assert out.startswith("net0 queue 1 (tx0): split size 8, enabled")
    assert "in flight: 1 chains (1 available)" in out
    assert main(["dump-queue", "1", "--json", "--run-dir", str(tmp_path / "run")]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["ok"] is True and reply["dump"]["avail"]["idx"] == 1
    assert main(["stats", "--json", "--run-dir", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["device"]["tx0"]["avail_idx"] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dump-queue", "7"], "harness dump-queue: dump-queue 7 refused: no queue 7"),
        (["stats", "--device", "net3"], "harness stats: no device 'net3' in the run"),
        (["dump-queue", "0", "--device", "net3"], "harness dump-queue: no device 'net3'"),
    ],
)
def test_refusals_are_one_line_and_exit_2(box: Box, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          argv: list[str], message: str) -> None:
    write_run(tmp_path / "run", box)
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err


@pytest.mark.parametrize("argv", [["dump-queue", "x"], ["dump-queue"], ["dump-queue", "-1"],
                                  ["stats", "--watch", "0"], ["stats", "--watch", "nan"],
                                  ["stats", "--watch", "soon"]])
def test_bad_arguments_exit_2_without_traceback(argv: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_no_running_vm_is_a_clear_message(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--run-dir", str(tmp_path)]) == 2
    assert main(["dump-queue", "0", "--run-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("has no run.json" in line for line in lines), lines
    # A run.json whose server is gone: the socket does not answer.
    (tmp_path / RUN_FILE).write_text(json.dumps({
        "pid": os.getpid(), "run_dir": str(tmp_path), "qmp": "", "devices": ["net0"],
        "control": [str(tmp_path / "gone.sock")], "console_socket": "", "console_log": ""}))
    assert main(["stats", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness stats: cannot reach the device server") and err.count("\n") == 1


def test_watch_refreshes_until_ctrl_c(box: Box, tmp_path: Path) -> None:
    write_run(tmp_path / "run", box)
    out = io.StringIO()
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        box.tx.add([HDR + b"z" * 60])  # something changes between two samples
        box.tx.kick()
        box.device.process()
        if len(naps) == 3:
            raise KeyboardInterrupt

    assert inspect.stats(tmp_path / "run", "net0", watch=0.5, out=out, sleep=sleep) == 0
    text = out.getvalue()
    assert naps == [0.5, 0.5, 0.5]
    assert text.count("Ctrl-C stops") == 3
    tx_rows = [line.split() for line in text.splitlines() if line.startswith("tx0")]
    assert [row[6] for row in tx_rows] == ["0", "1", "2"]  # chains, one more each time
    assert_fits(text)


def test_stats_show_the_rx_pool_and_the_tx_hold_off() -> None:
    reply = {"ok": True, "stats": {"device": {
        "rx_pool": "keep", "rx_pool_held": [40, 3], "tx_holdoff_us": 200, "tx_holdoffs": 17,
        "rx0": {"chains": 1}, "totals": {"chains": 1}}}}
    lines = inspect.render_stats(reply).splitlines()
    assert "rx pool  keep, 43 chains held, per pair 40 3" in lines
    assert "tx hold  200 us, 17 flushes held off" in lines
    assert_fits("\n".join(lines))
    # Odd shapes are shown as they can be, never a traceback.
    bad = {"ok": True, "stats": {"device": {"rx_pool": 7, "rx_pool_held": "x",
                                            "tx_holdoff_us": "y"}}}
    assert any(line.startswith("rx pool") for line in inspect.render_stats(bad).splitlines())
