"""harness.bench.wakeup: the host's wake-up cost, measured without touching the caller's CPUs,
never hanging on a lost peer, and printed by `harness bench net`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from harness.bench import net, netrun, wakeup
from harness.bench.net import Round

TWO_CPUS = len(os.sched_getaffinity(0)) > 1


def test_measure_gives_both_figures_and_leaves_the_callers_cpus_alone() -> None:
    before = os.sched_getaffinity(0)
    w = wakeup.measure(rounds=50, idle_rounds=3, idle=0.02)
    assert os.sched_getaffinity(0) == before  # QEMU and the server inherit it
    assert w["same_cpu_us"] > 0
    assert w["idle_ms"] == 20
    if TWO_CPUS:
        assert w["cross_cpu_us"] is not None and w["cross_cpu_us"] > 0
        assert w["idle_cross_cpu_us"] is not None and w["idle_cross_cpu_us"] > 0
        assert len(set(w["cpus"])) == 2


@pytest.mark.skipif(not TWO_CPUS, reason="needs two CPUs")
def test_the_after_idle_figure_times_the_sleepers_wake_up_not_the_sleep() -> None:
    # One way, from the post to the wake-up: never the idle sleep itself (0.2 s here), and
    # each post waits for the sleep (3 rounds of 0.2 s take at least 0.6 s).
    t0 = time.monotonic()
    us = wakeup._after_idle(3, 0, 1, 0.2)
    assert time.monotonic() - t0 >= 0.6
    assert 0 < us < 100_000


@pytest.mark.skipif(not TWO_CPUS, reason="needs two CPUs")
def test_the_two_threads_run_on_the_cpus_named(monkeypatch: pytest.MonkeyPatch) -> None:
    pinned: list[tuple[int, set[int]]] = []
    real = os.sched_setaffinity

    def record(pid: int, cpus: set[int]) -> None:
        pinned.append((pid, set(cpus)))
        real(pid, cpus)
    monkeypatch.setattr(os, "sched_setaffinity", record)
    w = wakeup.measure(rounds=20, idle_rounds=2, idle=0.01)
    a, b = w["cpus"]
    # The same-CPU run pins both threads to a, the cross and after-idle runs one to a and one
    # to b; each thread pins itself (pid 0), never the process.
    assert sorted(tuple(cpus) for _pid, cpus in pinned) == sorted(
        [(a,), (a,), (a,), (b,), (a,), (b,)])
    assert all(pid == 0 for pid, _cpus in pinned)


def test_a_peer_that_stops_answering_ends_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wakeup, "STALL", 0.05)
    monkeypatch.setattr(os, "eventfd_write", lambda fd, value: None)  # every post lost
    with pytest.raises(RuntimeError, match="stopped answering"):
        wakeup.measure(rounds=10)
    if TWO_CPUS:
        with pytest.raises(RuntimeError, match="stopped"):
            wakeup._after_idle(2, 0, 1, 0.01)


def test_halt_poll_read_or_none(tmp_path: Path) -> None:
    f = tmp_path / "guest_halt_poll_ns"
    f.write_text("200000\n")
    assert wakeup.halt_poll_ns(f) == 200000
    f.write_text("lots\n")
    assert wakeup.halt_poll_ns(f) is None
    assert wakeup.halt_poll_ns(tmp_path / "absent") is None


def test_line() -> None:
    w = wakeup.Wakeup(cross_cpu_us=35.25, same_cpu_us=1.5, idle_cross_cpu_us=181.4,
                      idle_ms=100.0, cpus=[0, 1], halt_poll_ns=0)
    assert wakeup.line(w) == ("host wake-up: 35.2 us across CPUs 0/1, 1.5 us on one, 181 us "
                              "across after 100 ms idle (haltpoll guest_halt_poll_ns=0)")
    w = wakeup.Wakeup(cross_cpu_us=None, same_cpu_us=2.0, idle_cross_cpu_us=None,
                      idle_ms=100.0, cpus=[3], halt_poll_ns=None)
    assert wakeup.line(w) == ("host wake-up: n/a (one CPU) across CPUs 3/3, 2.0 us on one "
                              "(no haltpoll)")


def _no_boots(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(_opts: netrun.Options, _progress: object) -> list[Round]:
        return []
    monkeypatch.setattr(net, "run", fake_run)


def _measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's figures, fixed."""
    monkeypatch.setattr(wakeup, "measure", lambda rounds=2000: wakeup.Wakeup(
        cross_cpu_us=35.0, same_cpu_us=1.5, idle_cross_cpu_us=180.0, idle_ms=100.0,
        cpus=[0, 1], halt_poll_ns=0))


def test_bench_net_prints_the_hosts_wake_up(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _no_boots(monkeypatch)
    _measured(monkeypatch)
    assert net.main(["--rounds", "1"]) == 0
    assert "host wake-up: 35.0 us across CPUs 0/1" in capsys.readouterr().out


def test_bench_net_json_has_the_hosts_wake_up_row(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _no_boots(monkeypatch)
    _measured(monkeypatch)
    assert net.main(["--rounds", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1] == {"config": "host", "workload": "wakeup", "unit": "us",
                        "cross_cpu_us": 35.0, "same_cpu_us": 1.5,
                        "idle_cross_cpu_us": 180.0, "idle_ms": 100.0, "cpus": [0, 1],
                        "halt_poll_ns": 0}


def test_a_failed_probe_does_not_end_the_bench(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _no_boots(monkeypatch)

    def broken(rounds: int = 2000) -> wakeup.Wakeup:
        raise RuntimeError("wake-up probe failed: the other thread stopped answering")
    monkeypatch.setattr(wakeup, "measure", broken)
    assert net.main(["--rounds", "1"]) == 0
    assert "host wake-up: not measured (wake-up probe failed" in capsys.readouterr().out
