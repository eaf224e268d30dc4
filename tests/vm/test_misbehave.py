"""A misbehaving device with a real guest: a few cheap cases of the catalogue, each run as
`harness misbehave` runs it, classified, and compared with the committed baseline for the
pinned kernel (qemu/baselines/misbehave-<version>.json)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.misbehave_run import SMALL_PLAN, case_spec, classify, load_baseline
from harness.runner import VmTestConfig, run_vm_test

from .conftest import need_root, record

pytestmark = pytest.mark.vm

#: (case, per-run timeout): cases the pinned kernel survives, plus one it does not (its hang
#: costs the timeout, so that one is short).
CASES = [("used-len-overflow", 60.0), ("bad-gso-type", 60.0), ("num-buffers-zero", 60.0),
         ("used-id-out-of-range", 20.0)]


@pytest.mark.parametrize("case, timeout", CASES, ids=[c for c, _ in CASES])
def test_reaction_matches_the_baseline(case: str, timeout: float, tmp_path: Path) -> None:
    need_root()
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
    baseline = load_baseline(result.kernel_version)
    assert baseline is not None, f"no baseline for {result.kernel_version}"
    assert cls == baseline[case], f"{case}: baseline {baseline[case]}, now {cls}: {evidence}"
