"""The host peer verifies what the C guest client sends and serves what it checks.

Loopback tests run the peer in-process on 127.0.0.1; the namespace test runs the real CLI inside
its own network namespaces (veth pair, 198.18.0.0/15), as the VM test does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.net.peer import Peer

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "guest" / "src" / "hnet.c"
NBYTES = 8 << 20
SEED = 5


@pytest.fixture(scope="module")
def hnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed: cannot build the C client")
    out = tmp_path_factory.mktemp("hnet") / "hnet"
    argv = ["gcc", "-Wall", "-Wextra", "-Werror", "-O2", "-static", "-o", str(out), str(SRC)]
    subprocess.run(argv, check=True)
    return out


class RunningPeer:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.status = ""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.status = self.peer.run()

    def results(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.peer.results_path.read_text())
        return data


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[RunningPeer]:
    for _ in range(20):  # random port block on loopback; retry if another process holds it
        base = random.randrange(20000, 60000, 3)
        p = Peer(
            tmp_path / "results.json",
            bind="127.0.0.1",
            nbytes=NBYTES,
            seed=SEED,
            udp_count=200,
            ports=(base, base + 1, base + 2),
            timeout=30,
            linger=0.1,
        )
        try:
            p.open()
            break
        except OSError:
            p.close()
    else:
        pytest.fail("no free loopback ports")
    running = RunningPeer(p)
    running.thread.start()
    yield running
    p.request_stop()
    running.thread.join(10)


def client(hnet: Path, cmd: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(hnet), cmd, "--host", "127.0.0.1", "--port", str(port), "--timeout", "20"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)


def metrics(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split())


def test_listening_file_written_before_any_client(peer: RunningPeer) -> None:
    r = peer.results()
    assert r["status"] == "listening"
    assert r["seed"] == SEED and r["bytes"] == NBYTES


def test_all_three_directions_ok(peer: RunningPeer, hnet: Path) -> None:
    sink, source, echo = peer.peer.ports
    n = str(NBYTES)
    send = client(hnet, "tcp-send", sink, "--bytes", n, "--seed", str(SEED))
    assert send.returncode == 0, send.stderr
    assert metrics(send.stdout)["bytes"] == n
    recv = client(hnet, "tcp-recv", source, "--bytes", n, "--seed", str(SEED))
    assert recv.returncode == 0, recv.stderr
    assert metrics(recv.stdout)["bytes"] == n
    udp = client(hnet, "udp-echo", echo, "--count", "200", "--seed", str(SEED))
    assert udp.returncode == 0, udp.stderr
    assert metrics(udp.stdout)["datagrams"] == "200"
    peer.thread.join(10)
    assert peer.status == "done"
    r = peer.results()
    tests = r["tests"]
    assert isinstance(tests, dict)
    assert tests["tcp_guest_to_host"]["ok"] is True
    assert tests["tcp_guest_to_host"]["bytes"] == NBYTES
    assert tests["tcp_host_to_guest"]["ok"] is True
    assert tests["udp_mixed"]["ok"] is True and tests["udp_mixed"]["good"] == 200
    assert int(metrics(udp.stdout)["bytes"]) == tests["udp_mixed"]["bytes"]


def test_sink_reports_corruption_to_guest(peer: RunningPeer, hnet: Path) -> None:
    send = client(hnet, "tcp-send", peer.peer.ports[0], "--bytes", str(NBYTES), "--seed", "6")
    assert send.returncode == 1
    assert "peer verdict: BAD 0 content" in send.stderr
    time.sleep(0.2)
    sink = peer.results()["tests"]["tcp_guest_to_host"]  # type: ignore[index]
    assert sink["ok"] is False and sink["first_mismatch"] == 0


def test_sink_reports_short_stream(peer: RunningPeer, hnet: Path) -> None:
    send = client(hnet, "tcp-send", peer.peer.ports[0], "--bytes", "1000", "--seed", str(SEED))
    assert send.returncode == 1 and "short stream" in send.stderr


def test_guest_detects_wrong_stream(peer: RunningPeer, hnet: Path) -> None:
    recv = client(hnet, "tcp-recv", peer.peer.ports[1], "--bytes", str(NBYTES), "--seed", "9")
    assert recv.returncode == 1 and "mismatch at offset 0" in recv.stderr


def test_udp_wrong_schedule_counted_bad(peer: RunningPeer, hnet: Path) -> None:
    udp = client(hnet, "udp-echo", peer.peer.ports[2], "--count", "3", "--seed", "7")
    assert udp.returncode == 0  # the echo is verbatim: only the host can see the schedule is off
    time.sleep(0.2)
    assert peer.peer.udp.bad == 3 and peer.peer.udp.first_bad == 0


def test_udp_retransmits_until_peer_appears(hnet: Path) -> None:
    # Nothing listens: the client keeps retrying (ICMP refused) and fails with a reason.
    argv = [str(hnet), "udp-echo", "--host", "127.0.0.1", "--port", "9", "--count", "1"]
    udp = subprocess.run(
        [*argv, "--rto-ms", "20", "--max-retries", "5", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert udp.returncode == 1 and "no echo after" in udp.stderr
    assert metrics(udp.stdout)["datagrams"] == "0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    host, guest = f"hpeer-h{os.getpid()}", f"hpeer-g{os.getpid()}"
    try:
        _ip("netns", "add", host)
        _ip("netns", "add", guest)
        _ip("link", "add", "hpv-h", "netns", host, "type", "veth", "peer", "hpv-g", "netns", guest)
        for ns, dev, addr in ((host, "hpv-h", "198.18.0.1/24"), (guest, "hpv-g", "198.18.0.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield host, guest
    finally:
        for ns in (host, guest):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_cli_in_netns(netns_pair: tuple[str, str], hnet: Path, tmp_path: Path) -> None:
    host, guest = netns_pair
    results = tmp_path / "peer.json"
    argv = [sys.executable, "-m", "harness.net.peer", "--netns", host, "--results", str(results)]
    argv += ["--bytes", str(NBYTES), "--seed", "3", "--udp-count", "100", "--linger", "0.1"]
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not results.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "peer never wrote its listening file"
            time.sleep(0.05)
        base = ["ip", "netns", "exec", guest, str(hnet)]
        common = ["--host", "198.18.0.1", "--seed", "3", "--timeout", "30"]
        for cmd, port, extra in (
            ("tcp-send", "5001", ["--bytes", str(NBYTES)]),
            ("tcp-recv", "5002", ["--bytes", str(NBYTES)]),
            ("udp-echo", "5003", ["--count", "100"]),
        ):
            run = subprocess.run(
                [*base, cmd, "--port", port, *common, *extra], capture_output=True, text=True
            )
            assert run.returncode == 0, (cmd, run.stderr)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
    r = json.loads(results.read_text())
    assert r["status"] == "done" and r["bind"] == "198.18.0.1"
    assert all(t["ok"] is True for t in r["tests"].values())


def test_cli_sigterm_writes_final_results(tmp_path: Path) -> None:
    results = tmp_path / "peer.json"
    base = random.randrange(20000, 60000, 3)
    argv = [sys.executable, "-m", "harness.net.peer", "--bind", "127.0.0.1"]
    argv += ["--port-base", str(base), "--results", str(results)]
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not results.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() == 3:
            pytest.skip("random loopback port block in use")
        proc.terminate()
        assert proc.wait(timeout=10) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = json.loads(results.read_text())
    assert r["status"] == "terminated"
    assert r["tests"]["tcp_guest_to_host"]["state"] == "pending"


def test_partial_plan_finishes_without_the_others(tmp_path: Path, hnet: Path) -> None:
    base = random.randrange(20000, 60000, 3)
    p = Peer(
        tmp_path / "r.json",
        bind="127.0.0.1",
        seed=2,
        udp_count=10,
        ports=(base, base + 1, base + 2),
        timeout=20,
        linger=0,
        expect=("udp_mixed",),
    )
    try:
        p.open()
    except OSError:
        pytest.skip("random loopback port block in use")
    running = RunningPeer(p)
    running.thread.start()
    udp = client(hnet, "udp-echo", base + 2, "--count", "10", "--seed", "2")
    assert udp.returncode == 0, udp.stderr
    running.thread.join(10)
    assert running.status == "done"
    assert running.results()["tests"]["tcp_guest_to_host"]["state"] == "pending"  # type: ignore[index]
    with pytest.raises(ValueError):
        Peer(tmp_path / "x.json", expect=("nonsense",))
