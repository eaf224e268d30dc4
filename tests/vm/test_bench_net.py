"""harness bench net boots both sides and gets numbers from each: ours through vfio-user-pci,
the reference through QEMU's own virtio-net-pci (checked in QEMU, not taken on trust)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import need_root

pytestmark = pytest.mark.vm


def test_one_round_each_side_gives_numbers(tmp_path: Path) -> None:
    need_root()
    out = subprocess.run(
        [sys.executable, "-m", "harness", "bench", "net", "--rounds", "1", "--bytes", "4M",
         "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "HARNESS_PROGRESS": "plain"})
    assert out.returncode == 0, out.stderr
    rows = {row["workload"]: row for row in json.loads(out.stdout)}
    for name in ("tcp_guest_to_host", "tcp_host_to_guest", "ping_rtt", "qemu_cpu"):
        assert rows[name]["ours"] > 0 and rows[name]["builtin"] > 0, rows[name]
        assert rows[name]["ratio"] > 0
    assert rows["server_cpu"]["ours"] > 0 and rows["server_cpu"]["builtin"] is None
    # Which device each side really ran: QEMU's own answer (qom type, PCI ids).
    rounds = {r["side"]: r for r in json.loads(next(tmp_path.glob("*/rounds.json")).read_text())}
    assert rounds["ours"]["device"]["type"] == "vfio-user-pci"
    assert rounds["builtin"]["device"]["type"] == "virtio-net-pci"
    assert rounds["builtin"]["device"]["device"] == "0x1041"  # modern virtio-net, like ours
    builtin_cmdline = (Path(rounds["builtin"]["run_dir"]) / "qemu.cmdline").read_text()
    assert "vfio-user-pci" not in builtin_cmdline and "-netdev tap,id=n0,fd=" in builtin_cmdline
    assert "mac=52:54:00:12:34:56" in builtin_cmdline
