"""Per-queue reset and guest announcements with the stock Linux driver, one boot per kernel.

``ring_reset=on``: ``ringparam eth0 rx 128 tx 128`` (guest/src/ringparam.c, the ETHTOOL_SRINGPARAM
ioctl of ``ethtool -G``) makes virtio_net resize both virtqueues through VIRTIO_F_RING_RESET
(queue_reset, a new ring, queue_enable), here while a UDP echo of verified payloads runs; the
echo completes, the device counted the queue resets, its rings have the new size, and no DMA
mapping leaked. ``ctrl_vq=on`` brings GUEST_ANNOUNCE: ``harness announce`` makes the guest send
a gratuitous ARP (seen on the host TAP) and acknowledge, which clears the status bit.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.net.netns import enter
from harness.session import RUN_FILE, run_info
from harness.testbed import SHELL_CMDLINE, DeviceSpec, PeerSpec, Testbed, TestbedConfig
from harness.virtio import constants as C

from .conftest import need_root

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]
SPEC = DeviceSpec()
UDP = f"hnet udp-echo --host {SPEC.host_address} --port 5003 --seed 7 --timeout 120"
ETH_P_ARP = 0x0806
ECHOES = 3000  # about 2 s of stop-and-wait echo: the resize lands in the middle


#: The pinned kernel, and the oldest one the matrix has (virtio_net's resize via queue reset
#: dates from 6.0): one boot each, about 9 s.
KERNELS = {"7.3": None, "6.1": Path("debian:6.1")}


@pytest.fixture(scope="module", params=list(KERNELS))
def testbed(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    need_root()
    cfg = TestbedConfig(console="socket", cmdline=SHELL_CMDLINE, kernel=KERNELS[request.param],
                        features="ring_reset=on,ctrl_vq=on",
                        peers=PeerSpec(tcp_bytes=1 << 20, udp_count=ECHOES, seed=7))
    with Testbed(cfg, tmp_path_factory.mktemp("ring_reset")) as tb:
        tb.wait_shell(120)
        yield tb


def device_stats(tb: Testbed) -> dict[str, object]:
    dev = tb.device.stats()["device"]
    assert isinstance(dev, dict)
    return dev


def test_ethtool_ring_resize_resets_the_queues_mid_traffic(testbed: Testbed) -> None:
    tb = testbed
    assert tb.guest.run("ringparam eth0", timeout=20).text.strip() == \
        "rx=256 tx=256 rx_max=256 tx_max=256"
    before = device_stats(tb)
    feats = before["features"]
    assert isinstance(feats, int) and feats >> C.F_RING_RESET & 1, "RING_RESET not negotiated"
    # The resize lands while the echo runs: chains in flight on the old rings are dropped by
    # the reset, the echo's retransmissions carry on over the new ones.
    r = tb.guest.run(f"{UDP} --count {ECHOES} >/tmp/echo.out 2>&1 & pid=$!; usleep 300000; "
                     "kill -0 $pid && running=1; ringparam eth0 rx 128 tx 128; rc=$?; "
                     "kill -0 $pid && running=$running$?; wait $pid; echo=$?; "
                     "cat /tmp/echo.out; echo resize=$rc echo=$echo running=$running",
                     timeout=180)
    out = r.text
    # The echo was running before and after the resize: the resets happened mid-traffic.
    assert "running=10" in out, out
    assert "rx=128 tx=128 rx_max=256 tx_max=256" in out, out
    assert "resize=0 echo=0" in out, out
    dev = device_stats(tb)
    assert dev["queue_resets"] == 2, dev["queue_resets"]  # rx0 and tx0, nothing else
    for q in ("rx0", "tx0"):
        state = dev[q]
        assert isinstance(state, dict)
        assert state["size"] == 128 and state["enabled"] is True and state["broken"] is False
    assert dev["bad_accesses"] == 0 and dev["needs_reset"] is False and dev["errors"] == 0

    # And back (a bigger ring), with traffic verified again afterwards.
    r = tb.guest.run(f"ringparam eth0 rx 256 tx 256 && {UDP} --count 200", timeout=180)
    assert r.returncode == 0 and "rx=256 tx=256" in r.text, r.text
    dev = device_stats(tb)
    assert dev["queue_resets"] == 4 and dev["bad_accesses"] == 0 and dev["errors"] == 0
    ledger = tb.device.stats()["ledger"]
    assert ledger["violations_total"] == 0, ledger["violations"]


def gratuitous_arp_listener(netns: str, ifname: str) -> socket.socket:
    """An AF_PACKET socket for ARP on ``ifname`` inside ``netns`` (it stays in that netns)."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            enter(netns)  # setns moves only this thread, which ends right after
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            s.bind((ifname, ETH_P_ARP))
            made.append(s)
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    t = threading.Thread(target=work, name="arp-listener")
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return made[0]


def wait_gratuitous_arp(s: socket.socket, ip: str, within: float) -> bytes | None:
    """The first ARP frame whose sender and target address are both ``ip``, or None."""
    want = socket.inet_aton(ip)
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            frame = s.recv(2048)
        except TimeoutError:
            return None
        arp = frame[14:42]
        if len(arp) == 28 and arp[14:18] == want and arp[24:28] == want:
            return frame
    return None


def test_harness_announce_makes_the_guest_send_a_gratuitous_arp(testbed: Testbed) -> None:
    tb = testbed
    info = run_info(tb)  # what `harness run` writes: the CLI finds the device through it
    info.write()
    listener = gratuitous_arp_listener(tb.netns, SPEC.tap)
    try:
        proc = subprocess.run([sys.executable, "-m", "harness", "announce",
                               "--run-dir", str(tb.run_dir)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "net0: announce requested (1 so far)\n"
        frame = wait_gratuitous_arp(listener, SPEC.guest_address, 20)
        assert frame is not None, "no gratuitous ARP from the guest within 20 s"
        assert frame[6:12] == bytes.fromhex(SPEC.mac.replace(":", ""))
        deadline = time.monotonic() + 10
        while True:  # the ack follows the ARP (netdev_notify_peers, then ANNOUNCE_ACK)
            ctrl = device_stats(tb)["ctrl"]
            assert isinstance(ctrl, dict)
            if ctrl["announce_acks"] == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (ctrl["announces"], ctrl["announce_acks"], ctrl["announce_pending"]) == \
            (1, 1, False), ctrl
        assert ctrl["errors"] == 0, ctrl["last_error"]
    finally:
        listener.close()
        (tb.run_dir / RUN_FILE).unlink(missing_ok=True)
