"""Misbehave cases whose class was a race: the RX notification cases wait for a quiet queue, a
case that never acted is no verdict, and a case gets the time its graceful run takes.

lost-interrupt-rx and interrupt-wrong-vector-rx act only on the first notification after
QUIET of silence on rx0 (harness.virtio.misbehave): before that the driver may still be
polling and find the frame anyway. `harness misbehave` reports a run in which its case never
acted as ``inactive`` (harness.misbehave_run), never as the kernel's reaction, and does not
record it in a baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import misbehave_run
from harness.guest import kernel
from harness.misbehave_run import HANG_TIMEOUT, INACTIVE, Outcome, case_timeout, run_case
from harness.report import Case, RunResult
from harness.testing.mockdriver import NetRig
from harness.virtio.misbehave import QUIET, QUIET_CASES
from tests.unit.test_misbehave import RX_VECTOR, clean, result, rig, rx_one


def armed_rx(r: NetRig) -> None:
    """One frame received by a driver that re-armed (used_event) for it, as Linux does."""
    r.rx.set_used_event(r.rx.last_used)
    rx_one(r)
    r.rx.get_used()


@pytest.mark.parametrize("case", QUIET_CASES)
def test_rx_notification_cases_act_only_after_silence(case: str,
                                                      misbehave_clock: list[float]) -> None:
    """A notification whose frames came right after others may find the driver still polling,
    which then needs no notification (a race the driver sometimes won): the RX notification
    cases act only on the first notification after QUIET of silence on rx0."""
    r, ledger = rig(f"{case}:after=4")
    armed_rx(r)
    misbehave_clock[0] += QUIET / 2
    armed_rx(r)  # frames QUIET/2 apart: not quiet (and not due yet)
    misbehave_clock[0] += 2 * QUIET
    armed_rx(r)  # quiet, but not due yet (the 4th completion is the first due)
    misbehave_clock[0] += QUIET / 100
    armed_rx(r)  # due, but the same batch: the first notification after the silence was spent
    assert r.irq.count(RX_VECTOR) == 4
    assert not r.device.stats()["misbehave"]["fired"]  # type: ignore[index]
    misbehave_clock[0] += 2 * QUIET
    armed_rx(r)  # due and the first after QUIET of silence: acted on
    assert r.device.stats()["misbehave"]["fired"] == {case: 1}  # type: ignore[index]
    assert r.irq.count(RX_VECTOR) == 4
    clean(ledger)


# ---- a case that never acted ---------------------------------------------------------------


def _fake_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fired: dict[str, int],
              *cases: Case, error: str | None = None, stats_file: bool = False) -> None:
    """run_vm_test replaced by one returning a result whose device counted ``fired``
    (written to net0-stats.json instead, as after a timeout, with ``stats_file``)."""
    import harness.runner

    r: RunResult = result(*cases, error=error)
    r.run_dir = str(tmp_path)
    (tmp_path / "console.log").write_text("boot\n")
    stats = {"device": {"misbehave": {"fired": fired}}}
    if stats_file:
        (tmp_path / "net0-stats.json").write_text(json.dumps(stats))
    else:
        r.device_stats = stats
    monkeypatch.setattr(harness.runner, "run_vm_test", lambda cfg: r)


OK = Case("tcp_guest_to_host", True, "4 MiB")


def test_a_case_that_never_acted_is_inactive(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    _fake_run(monkeypatch, tmp_path, {}, OK)
    out = run_case("lost-interrupt-rx", None, None, 25.0)
    assert out.cls == INACTIVE and "never acted" in out.evidence[0]
    _fake_run(monkeypatch, tmp_path, {"lost-interrupt-rx": 1}, OK)
    assert run_case("lost-interrupt-rx", None, None, 25.0).cls == "graceful"


def test_a_timed_out_run_acted_by_its_stats_file(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """A run that timed out has no counters in its result; the server's file says it acted."""
    _fake_run(monkeypatch, tmp_path, {"lost-interrupt-rx": 1},
              error="the guest did not finish its plan within 25 s", stats_file=True)
    assert run_case("lost-interrupt-rx", None, None, 25.0).cls == "hang"
    _fake_run(monkeypatch, tmp_path, {}, error="the guest did not finish its plan within 25 s",
              stats_file=True)
    assert run_case("lost-interrupt-rx", None, None, 25.0).cls == INACTIVE


def test_an_inactive_case_is_not_written_to_a_baseline(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(misbehave_run, "BASELINE_DIR", tmp_path)
    (tmp_path / "misbehave-7.3.4.json").write_text(json.dumps(
        {"kernel": "7.3.4", "cases": {"lost-interrupt-rx": "hang"}}))
    classes = {"lost-interrupt-rx": INACTIVE, "lost-interrupt": "graceful"}
    monkeypatch.setattr(misbehave_run, "run_case", lambda case, kernel, out, timeout: Outcome(
        case, classes[case], [], 1.0, str(tmp_path), "7.3.4"))
    assert misbehave_run.main(["lost-interrupt-rx", "lost-interrupt", "--write-baseline"]) == 0
    data = json.loads((tmp_path / "misbehave-7.3.4.json").read_text())
    assert data["cases"] == {"lost-interrupt-rx": "hang", "lost-interrupt": "graceful"}
    assert "not recorded: lost-interrupt-rx never acted" in capsys.readouterr().err
    # Without --write-baseline an inactive case is a change from the baseline: the run fails.
    assert misbehave_run.main(["lost-interrupt-rx"]) == 1
    assert "CHANGED lost-interrupt-rx: was hang, now inactive" in capsys.readouterr().out


def test_case_timeout_the_hang_budget_else_the_cases_own() -> None:
    """needs-reset-no-interrupt's graceful run outlasts 60 s (the guest's own timeouts):
    judged at 60 s its class was a race with the clock."""
    assert case_timeout("needs-reset-no-interrupt", "graceful") == 180.0
    assert case_timeout("needs-reset-no-interrupt", None) == 180.0
    # Never shortened: at the hang budget its class could only ever be a hang (6.12 and 6.1
    # were recorded so; with 180 s they end graceful).
    assert case_timeout("needs-reset-no-interrupt", "hang") == 180.0
    assert case_timeout("needs-reset-no-interrupt", "hang", given=30.0) == 30.0
    assert case_timeout("lost-interrupt-rx", "hang") == HANG_TIMEOUT
    assert case_timeout("lost-interrupt", "graceful") == 60.0
    assert case_timeout("lost-interrupt", "graceful", given=30.0) == 30.0
    assert case_timeout("lost-interrupt-rx", "hang", hang=10.0, given=30.0) == 10.0


def test_a_known_hang_gets_the_hang_budget_from_the_first_case(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """The kernel's baseline (the pinned one's without --kernel) gives the first case its
    timeout too (at 60 s, used-idx-backwards's guest finished its failing steps at 57 s
    once and read back graceful)."""
    monkeypatch.setattr(misbehave_run, "BASELINE_DIR", tmp_path)
    (tmp_path / f"misbehave-{misbehave_run.PINNED}.json").write_text(json.dumps(
        {"kernel": misbehave_run.PINNED, "cases": {"used-idx-backwards": "hang"}}))
    timeouts: list[float] = []

    def run(case: str, kernel: Path | None, out: Path | None, timeout: float) -> Outcome:
        timeouts.append(timeout)
        return Outcome(case, "hang", [], 1.0, str(tmp_path), misbehave_run.PINNED)

    monkeypatch.setattr(misbehave_run, "run_case", run)
    assert misbehave_run.main(["used-idx-backwards"]) == 0
    # A kernel of the user's: its own baseline (graceful here), found by its version first.
    (tmp_path / "misbehave-6.12.1.json").write_text(json.dumps(
        {"kernel": "6.12.1", "cases": {"used-idx-backwards": "graceful"}}))
    bz = tmp_path / "bzImage"
    bz.write_bytes(b"")
    monkeypatch.setattr(kernel, "bzimage_version", lambda path: "6.12.1")
    assert misbehave_run.main(["used-idx-backwards", "--kernel", str(bz)]) == 0
    # One without a baseline gets the pinned one's guess.
    monkeypatch.setattr(kernel, "bzimage_version", lambda path: "6.99.0")
    assert misbehave_run.main(["used-idx-backwards", "--kernel", str(bz)]) == 0
    assert timeouts == [HANG_TIMEOUT, 60.0, HANG_TIMEOUT]


def test_a_kernel_that_is_none_is_a_usage_error_before_any_boot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    def not_reached(*args: object) -> Outcome:
        raise AssertionError("booted")

    monkeypatch.setattr(misbehave_run, "run_case", not_reached)
    with pytest.raises(SystemExit) as exc:
        misbehave_run.main(["used-idx-backwards", "--kernel", str(tmp_path / "none")])
    assert exc.value.code == 2
    assert f"{tmp_path / 'none'} does not exist" in capsys.readouterr().err
