"""python -m harness.bench.rrpath: the in-process request/response path runs the real loop and
device end to end (every frame accounted for) and refuses bad arguments without a traceback."""

from __future__ import annotations

import json
import time

import pytest

from harness.bench import rrpath


@pytest.mark.parametrize("bursts", [True, False])
def test_a_short_run_gives_positive_figures_for_every_frame(bursts: bool) -> None:
    """Both paths, each checked to be the one named (the server's default is the bursts)."""
    res = rrpath.run(transactions=30, rounds=2, bursts=bursts)
    assert res["path"] == ("C bursts" if bursts else "Python path")
    assert res["tx_wake_us"] > 0 and res["rx_wake_us"] > 0
    assert res["transaction_us"] == pytest.approx(res["tx_wake_us"] + res["rx_wake_us"],
                                                  abs=0.02)


def test_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert rrpath.main(["--transactions", "20", "--rounds", "1", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"tx_wake_us", "rx_wake_us",
                                                        "transaction_us", "path", "idle_ms"}
    assert rrpath.main(["--transactions", "20", "--rounds", "1", "--python"]) == 0
    assert "Python path" in capsys.readouterr().out
    assert rrpath.main(["--transactions", "2", "--rounds", "1", "--idle", "5"]) == 0
    assert "median of 1 x 2, C bursts, 5 ms asleep before each" in capsys.readouterr().out
    assert rrpath.main(["--idle", "1"]) == 0  # a short default run with --idle: 3 x 30
    assert "median of 3 x 30, C bursts, 1 ms asleep before each" in capsys.readouterr().out
    for bad in (["--transactions", "0"], ["--rounds", "x"], ["--transactions", "60000"],
                ["--idle", "-1"], ["--idle", "1001"], ["--idle", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            rrpath.main(bad)
        assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_idle_sleeps_before_every_transaction_and_not_inside_the_timing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--idle is the cold path: a sleep before each transaction (warm-up ones too), kept out
    of the figures."""
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # no real sleep: count them
    res = rrpath.run(transactions=4, rounds=2, idle=0.25)
    assert sleeps == [0.25] * (4 + 2 * 4)  # 4 warm-up transactions, then 2 rounds of 4
    assert res["idle_ms"] == 250
    clock = iter(range(10**6))  # a clock that a sleep inside the timing would show
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        for _ in range(1000):
            next(clock)
    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock) * 1e-9)
    res = rrpath.run(transactions=2, rounds=1, idle=0.1)
    assert slept and res["tx_wake_us"] < 1.0  # 1000 ticks of 1 ns would be 1 us
