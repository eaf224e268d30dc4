"""A misbehaving device with a real guest: the catalogue on the pinned kernel, each case run as
`harness misbehave` runs it, classified, and compared with the committed baseline for that
kernel (qemu/baselines/misbehave-<version>.json).

`make test` runs every case on the pinned kernel; `make misbehave` runs all of them on all
three kernels of the matrix."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.misbehave_run import (
    PINNED,
    SMALL_PLAN,
    acted,
    case_spec,
    case_timeout,
    classify,
    device_stats,
    load_baseline,
    recover_seconds,
)
from harness.runner import VmTestConfig, run_vm_test
from harness.virtio.misbehave import CASES

from .conftest import need_root, record

pytestmark = pytest.mark.vm

#: Cases in `make test`: the whole catalogue on the pinned kernel (7 minutes in the gates of
#: 2026-11-30, 9 in the slower one of 2026-12-01: most cases 12-18 s there, the hangs
#: HANG_TIMEOUT, 25 s, plus shutdown; 7 minutes on that machine once the guest booted through
#: its PVH entry and pinged 0.2 s apart: most cases 9-11 s). Each case gets case_timeout():
#: the hang budget where the baseline records a hang, else (and always for a case with a longer
#: timeout of its own) the case's own (Case.timeout).
#: `make misbehave` runs every case on all three kernels of the matrix.
# used-idx-jump and used-idx-backwards were timing-dependent while the wrong used.idx stood only
# until the queue's next publish (hang in most gates, graceful in some); since 2026-12-02 it
# stands for PUBLISH_HOLD with an interrupt sent with it, so the driver reads it every time:
# they run here. used-idx-backwards raced once more (graceful in a gate of 2026-12-02: the
# driver had not yet taken everything, so one less was an index it had not reached); it waits
# for a driver that took everything (used_event, EVENT_IDX) since, and since 2026-12-03 (graceful
# once more in a gate: the driver read on into a stale slot holding a head it had in flight)
# the slot it reads past the new entries holds an id no queue has: out of range, every run.
# lost-interrupt-rx and interrupt-wrong-vector-rx were timing-dependent too (hang in most gates,
# graceful in some: a notification lost or misrouted while the driver was still in its RX poll
# was one it did not need). Since 2026-12-02 they act only on the first notification after 50 ms
# of silence on rx0 (misbehave.QUIET: a ping's reply, the driver waiting for it): hang on all
# three kernels, every run. They run here.
# needs-reset-no-interrupt: on 7.3.4 its plan ended right at the 60 s timeout (graceful in the
# baseline run, hang in two pytest runs of 2026-11-30); its runs take 55-146 s (which steps
# time out depends on where the device stops), so since 2026-12-02 it has 180 s (Case.timeout)
# and runs here.
TIMING_DEPENDENT: tuple[str, ...] = ()
CI_CASES = [c for c in CASES if c not in TIMING_DEPENDENT]


@pytest.mark.parametrize("case", CI_CASES)
def test_reaction_matches_the_baseline(case: str, tmp_path: Path) -> None:
    need_root()
    assert case in CASES
    baseline = load_baseline(PINNED) or {}
    timeout = case_timeout(case, baseline.get(case))
    result = run_vm_test(VmTestConfig(out_dir=tmp_path, timeout=timeout,
                                      misbehave=(case_spec(case),),
                                      tcp_bytes=SMALL_PLAN["tcp_bytes"],
                                      udp_count=SMALL_PLAN["udp_count"]))
    record(f"misbehave {case}", result)
    console = (Path(result.run_dir) / "console.log").read_text(errors="replace")
    cls, evidence = classify(result, console)
    # The device's counters say the case acted (a run that timed out has none in its result,
    # but the server still wrote them when it stopped), or the console shows the driver reacting.
    assert acted(case, result, evidence), (case, device_stats(result), evidence)
    if cls == "graceful":  # the guest got over it: the time it took is recorded
        assert recover_seconds(result) is not None, result.device_stats.get("device")
    baseline = load_baseline(result.kernel_version) or {}
    assert case in baseline, f"no baseline for {case} on {result.kernel_version}"
    assert cls == baseline[case], f"{case}: baseline {baseline[case]}, now {cls}: {evidence}"


