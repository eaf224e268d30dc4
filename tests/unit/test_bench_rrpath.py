"""python -m harness.bench.rrpath: the in-process request/response path runs the real loop and
device end to end (every frame accounted for) and refuses bad arguments without a traceback."""

from __future__ import annotations

import json

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
                                                        "transaction_us", "path"}
    assert rrpath.main(["--transactions", "20", "--rounds", "1", "--python"]) == 0
    assert "Python path" in capsys.readouterr().out
    for bad in (["--transactions", "0"], ["--rounds", "x"], ["--transactions", "60000"]):
        with pytest.raises(SystemExit) as exc:
            rrpath.main(bad)
        assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
