"""The device server outlives every vfio-user client: harness.testing.hostile_vfu against the real
server process, plus the failure counting of the context and the loop in-process.

The server runs as `python -m harness.server --serve-forever` in a network namespace of its own
(one per module); after each hostile case it must still run, serve a well-behaved client (VERSION
and a config space read), count exactly what the case should cost (client failures, error
replies, no callback failures) and hold no more fds than before.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import harness.vfu._vfu  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"harness.vfu._vfu is not built ({exc})", allow_module_level=True)

from harness import proc
from harness.checks import errors_check
from harness.dma import build_mapops
from harness.net.netns import private_netns
from harness.server.loop import DeviceLoop
from harness.testing import hostile_vfu as hv
from harness.testing.mockdriver import FakeIrq, MockMemory
from harness.testing.serverfakes import FakeEndpoint, PolledBackend, deadline
from harness.testing.vfu_client import CONFIG_REGION_INDEX, VfioUserClient, VfioUserError
from harness.vfu import DmaRegion, VfuContext, VfuError
from harness.virtio.net import VirtioNetDevice

REPO = Path(__file__).resolve().parents[2]
#: The server's --client-timeout here: short, so the stalling cases stay fast.
CLIENT_TIMEOUT = 0.5

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def control(path: Path, cmd: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        with s.makefile("rb") as f:
            reply: dict[str, Any] = json.loads(f.readline())
    assert reply["ok"], reply
    return reply


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    socket: str
    control: Path
    log: Path

    def vfio_user(self) -> dict[str, Any]:
        stats: dict[str, Any] = control(self.control, "stats")["stats"]["vfio_user"]
        return stats

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def settled_fds(self, want: int, timeout: float = 3.0) -> int:
        """The server's fd count once it has noticed the last clients leave."""
        end = time.monotonic() + timeout
        n = self.fds()
        while n > want and time.monotonic() < end:
            time.sleep(0.02)
            n = self.fds()
        return n


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # A short path: sun_path has 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with private_netns() as name:
        yield name


def start_server(workdir: Path, netns: str, name: str, *extra: str) -> Any:
    sock, ctl, log = workdir / f"{name}.sock", workdir / f"{name}-ctl.sock", workdir / f"{name}.log"
    argv = [sys.executable, "-m", "harness.server", "--socket", str(sock), "--netns", netns,
            "--tap", f"h{name}", "--control", str(ctl), "--client-timeout", str(CLIENT_TIMEOUT),
            *extra]
    return proc.managed(argv, log, name=f"server {name}", ready="READY"), sock, ctl, log


@pytest.fixture(scope="module")
def server(workdir: Path, netns: str) -> Iterator[Server]:
    managed, sock, ctl, log = start_server(workdir, netns, "forever", "--serve-forever")
    with managed as p:
        yield Server(p, str(sock), ctl, log)


@needs_root
@pytest.mark.parametrize("case", hv.CASES, ids=[c.name for c in hv.CASES])
def test_server_survives(server: Server, case: hv.HostileCase) -> None:
    before, fds = server.vfio_user(), server.fds()
    outcome = hv.run_case(server.socket, case)
    assert case.expect.matches(outcome), f"{case.name}: got {outcome}, expected {case.expect}"
    assert server.proc.poll() is None, f"the server died:\n{proc.tail(server.log)}"
    assert hv.well_behaved(server.socket) == hv.VIRTIO_NET_IDS
    after = server.vfio_user()
    assert after["client_failures"] - before["client_failures"] == int(case.client_failure), \
        after["last_failure"]
    if case.error_replies is not None:
        assert after["error_replies"] - before["error_replies"] == case.error_replies, \
            after["error_replies_by_command"]
    assert after["callback_failures"] == before["callback_failures"], \
        after["last_callback_failure"]
    assert after["clients"] > before["clients"]  # the well-behaved one at least
    assert server.settled_fds(fds) <= fds, "the case leaked fds in the server"


@needs_root
def test_without_serve_forever_only_an_attached_client_ends_the_server(
    workdir: Path, netns: str
) -> None:
    stats = workdir / "once-stats.json"
    managed, sock, _ctl, log = start_server(workdir, netns, "once", "--stats", str(stats))
    with managed as p:
        for name in ("garbage_instead_of_version", "version_bad_major", "version_never_sent"):
            hv.run_case(str(sock), hv.case_named(name))
            assert p.poll() is None, f"{name} ended the server:\n{proc.tail(log)}"
        assert hv.well_behaved(str(sock)) == hv.VIRTIO_NET_IDS
        assert p.wait(10) == 0, proc.tail(log)
    counters = json.loads(stats.read_text())["vfio_user"]
    assert (counters["clients"], counters["client_failures"], counters["disconnects"]) == (1, 3, 1)
    assert counters["last_failure"].startswith("attach: ")


# -- in-process: exact counting in the context, failure handling in the loop -----------------



class Pump:
    def __init__(self, ctx: VfuContext) -> None:
        self.ctx = ctx

    def __call__(self) -> None:
        if not self.ctx.attached:
            self.ctx.attach()
        else:
            self.ctx.run()


def small_ctx(path: str, *, read_error: BaseException | None = None,
              map_error: BaseException | None = None) -> VfuContext:
    def read(offset: int, count: int) -> bytes:
        if read_error is not None:
            raise read_error
        return bytes(count)

    def on_map(region: DmaRegion) -> None:
        if map_error is not None:
            raise map_error

    ctx = VfuContext(path)
    ctx.set_ids(0x1AF4, 0x1041, 0x1AF4, 0x1100)
    ctx.setup_region(0, 0x1000, read, lambda offset, data: None)
    ctx.setup_msix(2, table_bar=1, pba_bar=1)
    ctx.setup_dma(on_map, lambda region: None)
    ctx.realize()
    return ctx


def test_one_refusal_counts_once(sock_path: str) -> None:
    ctx = small_ctx(sock_path, read_error=OSError(errno.EINVAL, "no such register"))
    try:
        with VfioUserClient(sock_path, pump=Pump(ctx)) as client:
            client.connect()
            with pytest.raises(VfioUserError):
                client.region_read(0, 0, 4)
            with pytest.raises(VfioUserError):
                client.region_read(0, 0x2000, 4)  # out of bounds: the library refuses
        stats = ctx.stats()
        assert stats["error_replies_by_command"] == {"REGION_READ": 2}
        assert stats["callback_failures_by_kind"] == {"region_read": 1}
        assert "no such register" in str(stats["last_callback_failure"])
    finally:
        ctx.close()


def test_refused_dma_map_is_counted_although_the_library_accepts_it(sock_path: str) -> None:
    ctx = small_ctx(sock_path, map_error=ValueError("device refuses this region"))
    try:
        with VfioUserClient(sock_path, pump=Pump(ctx)) as client:
            client.connect()
            client.dma_map(0x100000, 0x1000)  # the register callback returns void
            with pytest.raises(VfioUserError) as info:
                client.dma_map((1 << 64) - 0x1000, 0x2000)  # wraps: refused before the library
            assert info.value.errno == errno.EINVAL
        stats = ctx.stats()
        assert stats["callback_failures_by_kind"] == {"dma_register": 1}
        assert stats["error_replies_by_command"] == {"DMA_MAP": 1}
        assert stats["refused_maps"] == 1 and "wraps" in str(stats["last_refused_map"])
    finally:
        ctx.close()


def test_context_serves_the_next_client_with_pristine_config(sock_path: str) -> None:
    ctx = small_ctx(sock_path)
    pump = Pump(ctx)
    try:
        with VfioUserClient(sock_path, pump=pump) as client:
            client.connect()
            client.region_write(CONFIG_REGION_INDEX, 4, b"\x06\x00")  # MEM + bus master
            assert client.region_read(CONFIG_REGION_INDEX, 4, 2) == b"\x06\x00"
        with pytest.raises(VfuError):
            ctx.run()  # Disconnected
        assert not ctx.attached
        with VfioUserClient(sock_path, pump=pump) as client:
            client.connect()
            assert client.region_read(CONFIG_REGION_INDEX, 4, 2) == b"\x00\x00"
    finally:
        ctx.close()


class FailingEndpoint(FakeEndpoint):
    """attach() fails ``failures`` times (as a bad VERSION does), then behaves."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def attach(self) -> bool:
        if self.failures:
            self.failures -= 1
            raise VfuError(errno.EINVAL, "vfu_attach_ctx: Invalid argument")
        return super().attach()


@pytest.mark.parametrize("forever", [False, True], ids=["once", "serve-forever"])
def test_loop_counts_attach_failures_and_keeps_waiting(forever: bool) -> None:
    mem = MockMemory(1 << 20)
    ops, ledger = build_mapops("direct", mem.memory, bus_master=lambda: True)
    assert ledger is not None
    backend = PolledBackend(readable=False)
    dev = VirtioNetDevice(ops, FakeIrq(), backend, mac=bytes(6), queue_size=16,
                          bus_master=lambda: True)
    endpoint = FailingEndpoint(failures=2)
    waits: list[str] = []
    loop = DeviceLoop(endpoint, dev, ledger, backend, idle_timeout=0.01, serve_forever=forever,
                      on_detached=lambda: waits.append("detached"))
    if forever:
        # After the client leaves the loop waits again: stop it at the next attach attempt.
        attach = endpoint.attach

        def attach_or_stop() -> bool:
            if waits:
                loop.request_stop()
                return False
            return attach()

        endpoint.attach = attach_or_stop  # type: ignore[method-assign]
    try:
        endpoint.peer.close()  # the client that attaches leaves at once
        with deadline(5.0):
            loop.serve()
        c = loop.clients
        assert (c.clients, c.client_failures, c.disconnects) == (1, 2, 1)
        assert c.last_failure == "attach: [Errno 22] vfu_attach_ctx: Invalid argument"
        assert waits == ["detached"]
        assert loop.stop is True
    finally:
        loop.close()
        endpoint.close()
        backend.close()


def test_device_no_errors_sees_refusals_that_got_no_error_reply() -> None:
    clean: dict[str, Any] = {"device": {"errors": 0}, "ledger": {"violations_total": 0},
                             "dma": {"failed_replies": 0},
                             "vfio_user": {"callback_failures": 0, "client_failures": 0}}
    assert errors_check(clean).ok
    refused_map = json.loads(json.dumps(clean))
    refused_map["vfio_user"]["callback_failures"] = 1  # a DMA map the device refused
    assert not errors_check(refused_map).ok
    dropped = json.loads(json.dumps(clean))
    dropped["vfio_user"]["client_failures"] = 1
    assert not errors_check(dropped).ok
