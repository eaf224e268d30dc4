"""harness.report.summary's line on the C bursts: what share of the traffic they carried."""

from __future__ import annotations

from typing import Any

from harness.report import RunResult, summary


def _summary(device: dict[str, Any]) -> list[str]:
    r = RunResult(accel="tcg", accel_reason="", map_ops="direct", viommu=False, faults="",
                  qemu_version="", kernel_version="7.3.4", run_dir="/tmp")
    r.device_stats = {"device": device}
    return [ln for ln in summary(r).splitlines() if "C bursts" in ln]


def test_the_share_of_each_direction_over_every_queue_pair() -> None:
    dev = {"tx_fast_chains": 1286, "rx_fast_frames": 5736,
           "tx0": {"chains": 4000}, "tx1": {"chains": 931},
           "rx0": {"packets": 5000, "chains": 9000}, "rx1": {"packets": 736},
           "totals": {"chains": 1, "packets": 1}, "ctrl": {"chains": 7}}
    assert _summary(dev) == ["  C bursts: TX chains 1286 of 4931, RX frames 5736 of 5736"]


def test_a_direction_switched_off_says_so_and_a_server_without_them_says_nothing() -> None:
    dev = {"tx_fast_chains": -1, "rx_fast_frames": 3, "tx0": {"chains": 2}, "rx0": {"packets": 3}}
    assert _summary(dev) == ["  C bursts: TX chains off, RX frames 3 of 3"]
    assert _summary({"tx0": {"chains": 2}}) == []
