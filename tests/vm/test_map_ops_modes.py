"""The whole guest plan in every map-ops mode and under every injected fault.

One guest boot per mode. Each must pass the same plan as the direct run, with the DMA ledger
clean (no violations, nothing left mapped, no failed vfio-user replies), and each fault must
really have been injected: a fault run that injected nothing proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from harness.report import RunResult
from harness.runner import VmTestConfig, run_vm_test

from .conftest import need_root, record

pytestmark = pytest.mark.vm

MIB = 1 << 20


@dataclass(frozen=True)
class Mode:
    name: str
    map_ops: str = "direct"
    viommu: bool = False
    faults: str | None = None
    tcp_bytes: int = 64 * MIB


MODES = [
    Mode("bounce", map_ops="bounce"),
    Mode("viommu", viommu=True),
    Mode("fault-mapping-error", faults="mapping-error=0.01,seed=7", tcp_bytes=16 * MIB),
    Mode("fault-iova-alloc", map_ops="bounce", faults="iova-alloc=0.05,seed=7",
         tcp_bytes=16 * MIB),
    Mode("fault-max-mapping-size", faults="max-mapping-size=2048", tcp_bytes=16 * MIB),
]


@pytest.fixture(scope="module", params=MODES, ids=lambda m: m.name)
def run(request: pytest.FixtureRequest) -> tuple[Mode, RunResult]:
    need_root()
    mode: Mode = request.param
    result = run_vm_test(VmTestConfig(map_ops=mode.map_ops, viommu=mode.viommu,
                                      faults=mode.faults, tcp_bytes=mode.tcp_bytes))
    record(mode.name, result)
    return mode, result


def ledger(result: RunResult) -> dict[str, Any]:
    data = result.device_stats.get("ledger")
    assert isinstance(data, dict), "the device reported no ledger"
    return data


def test_plan_passes(run: tuple[Mode, RunResult]) -> None:
    _, result = run
    assert result.error is None, result.error
    failed = [f"{c.name}: {c.detail}" for c in result.failed]
    assert not failed, failed
    assert {c.name for c in result.cases if c.ok} >= {
        "link_up", "ping_host", "tcp_guest_to_host", "tcp_host_to_guest", "udp_mixed",
        "host_verified_tcp_guest_to_host", "host_verified_udp", "device_counters_match_tap",
        "device_no_errors"}


def test_ledger_clean(run: tuple[Mode, RunResult]) -> None:
    _, result = run
    led = ledger(result)
    assert led["violations_total"] == 0, led["violations"]
    assert led["live"] == 0, "mappings left at exit"
    assert led["maps"] == led["unmaps"] > 0
    assert result.device_stats["dma"]["failed_replies"] == 0, \
        result.device_stats["dma"]["last_failure"]


def test_mode_really_in_effect(run: tuple[Mode, RunResult]) -> None:
    mode, result = run
    led = ledger(result)
    dma = result.device_stats["dma"]
    if mode.map_ops == "bounce":
        bounce = led["mapops"]
        assert bounce["mode"] == "bounce"
        assert bounce["bytes_to_device"] > mode.tcp_bytes  # the guest's TX went via bounce
        assert bounce["bytes_to_cpu"] > mode.tcp_bytes
    if mode.viommu:
        # The guest's own DMA API mapped every buffer: thousands of DMA_MAPs, all undone.
        assert dma["maps"] > 10_000 and dma["maps"] == dma["unmaps"]
        assert dma["peak_regions"] > 100
    if mode.faults and "mapping-error" in mode.faults:
        assert led["faults"]["injected"]["mapping_error"] > 0
        assert led["failed_maps"] > 0
    if mode.faults and "iova-alloc" in mode.faults:
        assert sum(led["faults"]["injected"]["iova_alloc"].values()) > 0
        bounce = led["mapops"]
        # "deferred" counts deferral events (a retry that fails again counts again).
        assert bounce["domain"]["deferred"] > 0, "no erase was deferred: path not exercised"
        assert bounce["domain"]["deferred_done"] > 0
        assert bounce["deferred_pending"] == 0, "deferred erases never finished"
    if mode.faults and "max-mapping-size" in mode.faults:
        # TCP sends fragments up to 32 KiB: they must have been mapped in 2 KiB pieces.
        assert led["map_bytes"] > 0 and led["maps"] > result.device_stats["device"][
            "tx0"]["packets"] * 2
