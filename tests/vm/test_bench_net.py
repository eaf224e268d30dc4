"""harness bench net boots every side and gets numbers for every workload from each: ours
through vfio-user-pci, ours with the ledger off, and the reference through QEMU's own
virtio-net-pci (checked in QEMU, not taken on trust)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.bench.net import WORKLOADS

from .conftest import need_root

pytestmark = pytest.mark.vm


def test_one_round_each_side_gives_numbers(tmp_path: Path) -> None:
    need_root()
    out = subprocess.run(
        [sys.executable, "-m", "harness", "bench", "net", "--rounds", "1", "--bytes", "4M",
         "--seconds", "1", "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "HARNESS_PROGRESS": "plain"})
    assert out.returncode == 0, out.stderr
    rows = {row["workload"]: row for row in json.loads(out.stdout)}
    for w in WORKLOADS:
        row = rows[w.name]
        assert row["ours"] > 0 and row["builtin"] > 0 and row["ours_ledger_off"] > 0, row
        assert row["ratio"] > 0
        if w.cpu_unit:  # per-workload CPU: our server on both ours sides, QEMU everywhere
            assert set(row["cpu"]) == {"ours_server", "ours_qemu", "builtin_qemu",
                                       "ours-noledger_server", "ours-noledger_qemu"}, row
    # What a wake-up costs on this host, measured before the boots (harness.bench.wakeup).
    assert rows["wakeup"]["config"] == "host" and rows["wakeup"]["same_cpu_us"] > 0
    # The guest's RAM arrived as DMA_MAPs, each timed by the server.
    assert rows["dma_map_reply"]["count"] > 0 and rows["dma_map_reply"]["ours"] > 0
    # Which device each side really ran: QEMU's own answer (qom type, PCI ids).
    rounds = {r["side"]: r for r in json.loads(next(tmp_path.glob("*/rounds.json")).read_text())}
    assert rounds["ours"]["device"]["type"] == "vfio-user-pci"
    assert rounds["ours-noledger"]["device"]["type"] == "vfio-user-pci"
    assert rounds["builtin"]["device"]["type"] == "virtio-net-pci"
    assert rounds["builtin"]["device"]["device"] == "0x1041"  # modern virtio-net, like ours
    builtin_cmdline = (Path(rounds["builtin"]["run_dir"]) / "qemu.cmdline").read_text()
    assert "vfio-user-pci" not in builtin_cmdline and "-netdev tap,id=n0,fd=" in builtin_cmdline
    assert "mac=52:54:00:12:34:56" in builtin_cmdline
    # The ledger-off side really ran without checks, the ours side with them.
    logs = {side: (Path(r["run_dir"]) / "net0-server.log").read_text()
            for side, r in rounds.items() if side != "builtin"}
    assert "HARNESS_LEDGER=off" in logs["ours-noledger"]
    assert "HARNESS_LEDGER=off" not in logs["ours"]


def test_roundtrip_pairs_each_dma_request_with_its_reply_in_qemus_trace() -> None:
    """python -m harness.bench.roundtrip on the real QEMU: its trace events still exist under
    these names, and every DMA_MAP/UNMAP the guest sent found its reply."""
    need_root()
    out = subprocess.run([sys.executable, "-m", "harness.bench.roundtrip", "--seconds", "1",
                          "--json"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HARNESS_PROGRESS": "plain"})
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["output"].startswith("sent="), s
    for kind in ("map", "unmap"):
        k = s[kind]
        assert k["count"] > 100, s
        assert 0 < k["p50_us"] <= k["p90_us"] <= k["p99_us"], s
        # The guest's wait holds the server's whole answer; a pairing gone wrong would not.
        assert k["p50_us"] >= k["server_callback_p50_us"] > 0, s
    assert 0 < s["waited_share"] < 1, s
