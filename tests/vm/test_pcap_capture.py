"""--pcap with a real guest: tshark reads every frame the device moved, in both directions, and
the UDP payloads in it are exactly the schedule the guest sent and the host echoed."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from shutil import which

import pytest

from harness.checks import RX, TX
from harness.net.stream import udp_payload
from harness.runner import VmTestConfig, run_vm_test

from .conftest import need_root, record

pytestmark = pytest.mark.vm
UDP_COUNT = 300
SEED = 5
INBOUND, OUTBOUND = "0x00000001", "0x00000002"  # pcapng epb_flags: to the guest, from it


def test_pcap_holds_every_frame_and_the_udp_schedule(tmp_path: Path) -> None:
    need_root()
    if which("tshark") is None:
        pytest.skip("tshark is not installed (make deps installs it)")
    cap = tmp_path / "run.pcapng"
    result = run_vm_test(VmTestConfig(tcp_bytes=1 << 20, udp_count=UDP_COUNT, seed=SEED,
                                      pcap=cap, out_dir=tmp_path))
    record("pcap", result)
    assert result.ok, result.error or [c.name for c in result.failed]

    frames = subprocess.run(["tshark", "-r", str(cap), "-T", "fields",
                             "-e", "frame.packet_flags_direction"],
                            capture_output=True, text=True, check=True).stdout.split()
    dirs = Counter(frames)
    stats = result.device_stats["device"]
    assert dirs[OUTBOUND] == stats[TX]["packets"]
    assert dirs[INBOUND] == stats[RX]["packets"]

    udp = subprocess.run(["tshark", "-r", str(cap), "-d", "udp.port==5003,data", "-Y",
                          "udp.port==5003", "-T", "fields", "-e",
                          "frame.packet_flags_direction", "-e", "udp.dstport", "-e", "data.data"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    sent = {bytes.fromhex(p) for d, port, p in (ln.split("\t") for ln in udp)
            if d == OUTBOUND and port == "5003"}
    echoed = {bytes.fromhex(p) for d, port, p in (ln.split("\t") for ln in udp)
              if d == INBOUND and port != "5003"}
    schedule = {udp_payload(SEED, i) for i in range(UDP_COUNT)}
    assert sent == schedule
    assert echoed == schedule
