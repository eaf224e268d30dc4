"""The end-to-end tier: a real QEMU guest, its stock virtio_net driver, our device, a real TAP.

One guest boot per module (it takes a while under TCG); every guest test and every host-side
check is its own pytest result, asserted on what actually happened.
"""

from __future__ import annotations

import pytest

from harness.report import RunResult
from harness.runner import VmTestConfig, run_vm_test

from .conftest import need_root, record

pytestmark = pytest.mark.vm

GUEST_TESTS = ["link_up", "ping_host", "tcp_guest_to_host", "tcp_host_to_guest", "udp_mixed"]
HOST_CHECKS = ["host_verified_tcp_guest_to_host", "host_verified_udp",
               "device_counters_match_tap", "device_no_errors"]


@pytest.fixture(scope="module")
def run() -> RunResult:
    need_root()
    result = run_vm_test(VmTestConfig())
    record("direct", result)
    return result


def test_run_completed(run: RunResult) -> None:
    assert run.error is None, run.error


@pytest.mark.parametrize("name", GUEST_TESTS + HOST_CHECKS)
def test_case(run: RunResult, name: str) -> None:
    case = run.case(name)
    assert case is not None, f"{name} was not reported (see {run.run_dir}/console.log)"
    assert case.ok is True, f"{name}: {case.detail}"


def test_throughput_reported(run: RunResult) -> None:
    for name in ("tcp_guest_to_host", "tcp_host_to_guest"):
        case = run.case(name)
        assert case is not None and float(case.metrics.get("mbps", 0)) > 0
