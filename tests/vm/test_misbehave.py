"""A misbehaving device with a real guest: the catalogue on the pinned kernel, each case run as
`harness misbehave` runs it, classified, and compared with the committed baseline for that
kernel (qemu/baselines/misbehave-<version>.json).

`make test` runs the cheapest cases that fit its budget of about 6 minutes (CI_CASES, from the
measured per-case times in docs/MISBEHAVE.md); `make misbehave` runs all of them, on all three
kernels of the matrix."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.misbehave_run import (
    HANG_TIMEOUT,
    PINNED,
    SMALL_PLAN,
    case_spec,
    classify,
    load_baseline,
    recover_seconds,
)
from harness.runner import VmTestConfig, run_vm_test
from harness.virtio.misbehave import CASES

from .conftest import need_root, record

pytestmark = pytest.mark.vm

#: Cases in `make test`: every case that takes about 10 s on 7.3.4 (measured, see
#: docs/MISBEHAVE.md), the 17 s and 25 s graceful ones, and four of the eight hangs (each costs
#: HANG_TIMEOUT, 25 s): about 6 minutes. Left to `make misbehave`: the hangs used-idx-jump,
#: tx-completion-wrong-id, needs-reset-midtraffic, needs-reset-during-probe, and
#: needs-reset-no-interrupt (60 s: its plan waits out every step).
CI_CASES = [
    "used-len-overflow", "used-len-zero", "num-buffers-too-large", "gso-size-zero",
    "csum-start-beyond-frame", "num-buffers-zero", "bad-gso-type", "interrupt-storm",
    "link-flap", "config-change-no-interrupt", "tx-used-len-nonzero", "rx-len-below-header",
    "used-out-of-order", "used-never-returned", "data-valid-bad-csum",
    "rx-header-reserved-flags", "lost-interrupt", "interrupt-wrong-vector",
    "mac-change-after-negotiation", "config-generation-stale", "config-interrupt-storm",
    "features-ok-refused", "forbidden-feature-combo", "slow-completions",
    "reset-never-completes",
    "used-id-out-of-range", "used-id-duplicate", "used-idx-backwards", "tx-stall",
]


@pytest.mark.parametrize("case", CI_CASES)
def test_reaction_matches_the_baseline(case: str, tmp_path: Path) -> None:
    need_root()
    assert case in CASES
    baseline = load_baseline(PINNED) or {}
    timeout = HANG_TIMEOUT if baseline.get(case) == "hang" else 60.0
    result = run_vm_test(VmTestConfig(out_dir=tmp_path, timeout=timeout,
                                      misbehave=(case_spec(case),),
                                      tcp_bytes=SMALL_PLAN["tcp_bytes"],
                                      udp_count=SMALL_PLAN["udp_count"]))
    record(f"misbehave {case}", result)
    console = (Path(result.run_dir) / "console.log").read_text(errors="replace")
    cls, evidence = classify(result, console)
    if result.device_stats:  # the device's counters say the case acted
        fired = result.device_stats.get("device", {}).get("misbehave", {}).get("fired", {})
        assert fired.get(case), (case, result.device_stats.get("device", {}).get("misbehave"))
    else:  # a run that timed out has none: then the driver's complaint is the proof
        assert any(e.startswith("console: ") for e in evidence), evidence
    if cls == "graceful":  # the guest got over it: the time it took is recorded
        assert recover_seconds(result) is not None, result.device_stats.get("device")
    baseline = load_baseline(result.kernel_version) or {}
    assert case in baseline, f"no baseline for {case} on {result.kernel_version}"
    assert cls == baseline[case], f"{case}: baseline {baseline[case]}, now {cls}: {evidence}"

