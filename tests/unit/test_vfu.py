"""harness.vfu against the real libvfio-user: context setup, and a real client over the socket."""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

try:
    import harness.vfu._vfu  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(
        f"harness.vfu._vfu is not built ({exc}); run `python -m harness.vfu.build`",
        allow_module_level=True,
    )

from harness.testing.vfu_client import VfioUserClient, VfioUserError
from harness.vfu import (
    Disconnected,
    DmaRegion,
    ResetType,
    VfuContext,
    VfuError,
    memory_barrier,
)
from harness.vfu._vfu import ffi
from harness.vfu.dmaregs import DmaRegistry
from harness.vfu.model import PROT_READ, PROT_WRITE

VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_CONFIG_REGION_INDEX = 7
BAR0_SIZE = 0x4000
NR_VECTORS = 3
VENDOR_CAP = bytes([0x09, 0, 16, 1, 0, 0, 0, 0]) + struct.pack("<II", 0, 0x40)



@dataclass
class Device:
    """A Python device behind a VfuContext, recording what the callbacks saw."""

    bar0: bytearray = field(default_factory=lambda: bytearray(BAR0_SIZE))
    maps: list[DmaRegion] = field(default_factory=list)
    unmaps: list[DmaRegion] = field(default_factory=list)
    resets: list[ResetType] = field(default_factory=list)
    fail_with: BaseException | None = None

    def read(self, offset: int, count: int) -> bytes:
        if self.fail_with is not None:
            raise self.fail_with
        return bytes(self.bar0[offset : offset + count])

    def write(self, offset: int, data: memoryview) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.bar0[offset : offset + len(data)] = data

    def on_map(self, region: DmaRegion) -> None:
        self.maps.append(region)

    def on_unmap(self, region: DmaRegion) -> None:
        self.unmaps.append(region)


def make_ctx(path: str, dev: Device) -> VfuContext:
    ctx = VfuContext(path)
    ctx.set_ids(0x1AF4, 0x1041, 0x1AF4, 0x1100)
    ctx.set_class(0x02, 0x00, 0x00)
    ctx.set_revision(1)
    ctx.setup_region(0, BAR0_SIZE, dev.read, dev.write)
    ctx.setup_msix(NR_VECTORS, table_bar=1, pba_bar=1)
    ctx.add_capability(VENDOR_CAP)
    ctx.setup_dma(dev.on_map, dev.on_unmap)
    ctx.setup_reset(dev.resets.append)
    ctx.realize()
    return ctx


class Pump:
    """Runs the server side between client operations on the same thread."""

    def __init__(self, ctx: VfuContext) -> None:
        self.ctx = ctx
        self.attached = False

    def __call__(self) -> None:
        if not self.attached:
            self.attached = self.ctx.attach()
        else:
            self.ctx.run()


@pytest.fixture
def served(sock_path: str) -> Iterator[tuple[VfuContext, Device, VfioUserClient]]:
    dev = Device()
    ctx = make_ctx(sock_path, dev)
    client = VfioUserClient(sock_path, pump=Pump(ctx))
    try:
        client.connect()
        yield ctx, dev, client
    finally:
        client.close()
        ctx.close()


# -- context alone -------------------------------------------------------------------------


def test_configure_realize_attach_close(sock_path: str) -> None:
    dev = Device()
    ctx = make_ctx(sock_path, dev)
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    assert ctx.attach() is False  # nobody connected
    fd = ctx.fileno()
    assert stat.S_ISSOCK(os.fstat(fd).st_mode)
    ctx.close()
    assert not os.path.exists(sock_path)
    ctx.close()  # idempotent
    with pytest.raises(VfuError) as info:
        ctx.attach()
    assert info.value.errno == errno.EBADF


def test_config_space_layout(sock_path: str) -> None:
    with make_ctx(sock_path, Device()) as ctx:
        cfg = ctx.config_space()
        assert len(cfg) == 4096
        vid, did = struct.unpack_from("<HH", cfg, 0)
        assert (vid, did) == (0x1AF4, 0x1041)
        assert cfg[8] == 1  # revision
        assert bytes(cfg[9:12]) == bytes([0x00, 0x00, 0x02])  # pi, sub, base
        assert struct.unpack_from("<HH", cfg, 0x2C) == (0x1AF4, 0x1100)
        assert cfg[0x34] == 0x40  # capability list starts with MSI-X
        cap_id, nxt, mxc, table, pba = struct.unpack_from("<BBHII", cfg, 0x40)
        assert cap_id == 0x11 and mxc == NR_VECTORS - 1
        assert (table & 7, table & ~7) == (1, 0)
        assert (pba & 7, pba & ~7) == (1, 0x800)
        assert nxt == 0x4C and cfg[0x4C] == 0x09
        assert bytes(cfg[0x4C + 3 : 0x4C + 16]) == VENDOR_CAP[3:]


def test_stale_socket_is_replaced(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # leaves the path behind, like a crashed server
    with VfuContext(sock_path) as ctx:
        ctx.realize()
        assert ctx.attach() is False


def test_regular_file_at_socket_path_is_not_removed(sock_path: str) -> None:
    with open(sock_path, "w") as f:
        f.write("precious")
    with pytest.raises(VfuError):
        VfuContext(sock_path)
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_bad_arguments_are_refused(sock_path: str) -> None:
    with VfuContext(sock_path) as ctx:
        with pytest.raises(ValueError):
            ctx.setup_region(0, 3000, lambda o, n: bytes(n), lambda o, d: None)
        with pytest.raises(ValueError):
            ctx.setup_region(9, 4096, lambda o, n: bytes(n), lambda o, d: None)
        with pytest.raises(ValueError):
            ctx.setup_msix(0, 1, 1)
        with pytest.raises(VfuError) as info:
            ctx.add_capability(bytes([0x42, 0, 0, 0]))  # unsupported capability id
        assert info.value.errno == errno.ENOTSUP


def test_memory_barrier() -> None:
    memory_barrier()


# -- with a client -------------------------------------------------------------------------


def test_negotiation_and_device_info(served: tuple[VfuContext, Device, VfioUserClient]) -> None:
    ctx, _, client = served
    assert client.server_version == (0, 1)
    assert client.server_caps.get("max_msg_fds")
    assert stat.S_ISSOCK(os.fstat(ctx.fileno()).st_mode)
    info = client.device_info()
    assert info.num_regions >= 8
    assert client.region_info(0).size == BAR0_SIZE
    assert client.region_info(1).size == 4096  # created by setup_msix
    assert client.irq_count(VFIO_PCI_MSIX_IRQ_INDEX) == NR_VECTORS
    cfg = client.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, 4)
    assert struct.unpack("<HH", cfg) == (0x1AF4, 0x1041)


def test_region_round_trip(served: tuple[VfuContext, Device, VfioUserClient]) -> None:
    _, dev, client = served
    client.region_write(0, 0x20, b"\x01\x02\x03\x04")
    assert bytes(dev.bar0[0x20:0x24]) == b"\x01\x02\x03\x04"
    assert client.region_read(0, 0x1E, 8) == b"\0\0\x01\x02\x03\x04\0\0"


def test_raising_callback_returns_eio_and_server_survives(
    served: tuple[VfuContext, Device, VfioUserClient], caplog: pytest.LogCaptureFixture
) -> None:
    _, dev, client = served
    dev.fail_with = RuntimeError("device bug")
    with pytest.raises(VfioUserError) as info:
        client.region_read(0, 0, 4)
    assert info.value.errno == errno.EIO
    assert "device bug" in caplog.text
    with pytest.raises(VfioUserError) as info:
        client.region_write(0, 0, b"\0\0\0\0")
    assert info.value.errno == errno.EIO
    dev.fail_with = OSError(errno.EINVAL, "refused")  # deliberate refusal keeps its errno
    with pytest.raises(VfioUserError) as info:
        client.region_read(0, 0, 4)
    assert info.value.errno == errno.EINVAL
    dev.fail_with = None
    assert client.region_read(0, 0, 4) == bytes(4)


def test_short_read_is_an_error(served: tuple[VfuContext, Device, VfioUserClient]) -> None:
    _, _, client = served
    with pytest.raises(VfioUserError) as info:
        client.region_read(0, BAR0_SIZE - 2, 4)  # the device returns 2 bytes; the lib accepts
    assert info.value.errno in (errno.EINVAL, errno.ERANGE)


def test_keyboard_interrupt_in_callback_resurfaces_from_run(sock_path: str) -> None:
    dev = Device()
    ctx = make_ctx(sock_path, dev)
    pump = Pump(ctx)
    client = VfioUserClient(sock_path, pump=pump)
    try:
        client.connect()
        dev.fail_with = KeyboardInterrupt()
        pump.attached = True
        with pytest.raises(KeyboardInterrupt):
            client.region_read(0, 0, 4)
    finally:
        client.close()
        ctx.close()


def memfd_with_pattern(size: int) -> int:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    os.pwrite(fd, bytes(range(256)) * (size // 256), 0)
    return fd


def test_dma_map_gives_view_of_memfd(served: tuple[VfuContext, Device, VfioUserClient]) -> None:
    _, dev, client = served
    fd = memfd_with_pattern(0x4000)
    try:
        client.dma_map(0x100000, 0x2000, fd=fd, offset=0x1000)
        (region,) = dev.maps
        assert (region.iova, region.size) == (0x100000, 0x2000)
        assert region.prot == PROT_READ | PROT_WRITE and region.writable
        assert region.view is not None and len(region.view) == 0x2000
        assert bytes(region.view[:4]) == bytes(range(4))  # file offset 0x1000 -> pattern 0..
        region.view[0x10:0x14] = b"WXYZ"  # shared mapping: the guest (memfd) sees it
        assert os.pread(fd, 4, 0x1010) == b"WXYZ"
        client.dma_unmap(0x100000, 0x2000)
        assert dev.unmaps == [region]
        assert dev.unmaps[0] is region
        with pytest.raises(ValueError):
            region.view[0]  # released: fails loudly instead of touching unmapped memory
    finally:
        os.close(fd)


def test_dma_map_without_fd_has_no_view(served: tuple[VfuContext, Device, VfioUserClient]) -> None:
    _, dev, client = served
    client.dma_map(0xC0000, 0x20000, writable=False)
    (region,) = dev.maps
    assert region.view is None and region.prot == PROT_READ


def test_read_only_dma_view(served: tuple[VfuContext, Device, VfioUserClient]) -> None:
    _, dev, client = served
    fd = memfd_with_pattern(0x1000)
    try:
        client.dma_map(0x200000, 0x1000, fd=fd, writable=False)
        (region,) = dev.maps
        assert region.view is not None and region.view.readonly
    finally:
        os.close(fd)


def _two_maps_one_range_unmap(client: VfioUserClient) -> None:
    """Map two pages of a memfd, then unmap both with one DMA_UNMAP of the range."""
    fd = memfd_with_pattern(0x4000)
    try:
        client.dma_map(0x10000, 0x1000, fd=fd, offset=0)
        client.dma_map(0x12000, 0x1000, fd=fd, offset=0x1000)
        try:
            client.dma_unmap(0x10000, 0x10000)
        except VfioUserError as exc:
            if exc.errno == errno.ENOENT:
                pytest.xfail("libvfio-user built without the range-unmap patch")
            raise
    finally:
        os.close(fd)


def test_range_unmap_removes_every_region_inside(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    _, dev, client = served
    _two_maps_one_range_unmap(client)
    assert sorted(r.iova for r in dev.unmaps) == [0x10000, 0x12000]


def test_a_map_reaches_the_device_once_its_reply_is_out(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    """The guest's vCPU waits for the DMA_MAP reply: the device's own work on the region
    (on_map) runs after the library has sent it, within the same run()."""
    ctx, dev, client = served
    sock = client._sock
    assert sock is not None
    replied: list[bool] = []

    def on_map(region: DmaRegion) -> None:
        replied.append(bool(select.select([sock], [], [], 0)[0]))  # the reply is readable
        dev.maps.append(region)

    ctx.setup_dma(on_map, dev.on_unmap)
    fd = memfd_with_pattern(0x2000)
    try:
        client.dma_map(0x40000, 0x1000, fd=fd)
        assert replied == [True] and [r.iova for r in dev.maps] == [0x40000]
    finally:
        os.close(fd)


def _dma_info(iova: int, size: int) -> Any:
    info = ffi.new("vfu_dma_info_t *")
    info.iova.iov_base = ffi.cast("void *", iova)
    info.iova.iov_len = size
    info.prot = PROT_READ | PROT_WRITE
    return info


def test_an_unmap_sees_its_map_first_and_a_failing_map_stops_no_other() -> None:
    reg = DmaRegistry()
    events: list[str] = []
    failed: list[BaseException] = []

    def on_map(region: DmaRegion) -> None:
        if region.iova == 0x1000:
            raise RuntimeError("map bug")
        events.append(f"map {region.iova:#x}")

    reg.on_map, reg.on_map_failed = on_map, failed.append
    reg.on_unmap = lambda region: events.append(f"unmap {region.iova:#x}")
    a, b = _dma_info(0x1000, 0x1000), _dma_info(0x3000, 0x1000)
    reg.register(a)
    reg.register(b)
    assert events == []          # nothing before apply_maps (or an unmap)
    reg.unregister(b)            # the pending maps first, in order
    assert events == ["map 0x3000", "unmap 0x3000"]
    assert [str(e) for e in failed] == ["map bug"]
    assert reg.latency["map_apply"].count == 2
    reg.apply_maps()             # nothing twice
    assert events == ["map 0x3000", "unmap 0x3000"]


def test_dma_timings_are_filed_per_message_once_the_reply_is_out(
    served: tuple[VfuContext, Device, VfioUserClient],
) -> None:
    """Real libvfio-user: two maps and a range unmap of both (one message, two callbacks).
    The context files the timings after vfu_run_ctx; the unmap's wait counts once."""
    ctx, dev, client = served
    ctx.message_origin = time.monotonic()  # what the server loop sets before each run()
    _two_maps_one_range_unmap(client)
    assert len(dev.unmaps) == 2
    filed = ctx._dma._latency  # as run() left them, not through the filing property
    assert filed["map_callback"].count == filed["map_library"].count == 2
    assert filed["unmap_callback"].count == 2 and filed["unmap_library"].count == 1
    assert filed["map_reply"].count == 2 and filed["unmap_reply"].count == 1
    assert ctx.dma_events == 4


def test_reset_and_disconnect(served: tuple[VfuContext, Device, VfioUserClient]) -> None:
    ctx, dev, client = served
    fd = memfd_with_pattern(0x1000)
    try:
        client.dma_map(0x100000, 0x1000, fd=fd)
    finally:
        os.close(fd)
    client.reset()
    assert dev.resets == [ResetType.DEVICE]
    client.close()
    with pytest.raises(Disconnected):
        ctx.run()
    assert dev.resets[-1] == ResetType.LOST_CONN
    assert [r.iova for r in dev.unmaps] == [0x100000]
    assert ctx.attach() is False  # listening again


def test_irq_trigger_without_eventfd(served: tuple[VfuContext, Device, VfioUserClient]) -> None:
    ctx, _, _ = served
    assert ctx.irq_trigger(0) is False
    with pytest.raises(VfuError) as info:
        ctx.irq_trigger(NR_VECTORS)
    assert info.value.errno == errno.EINVAL


def test_raising_dma_and_reset_callbacks_do_not_escape(
    served: tuple[VfuContext, Device, VfioUserClient], caplog: pytest.LogCaptureFixture
) -> None:
    ctx, dev, client = served

    def bad_map(region: DmaRegion) -> None:
        dev.maps.append(region)
        raise RuntimeError("map bug")

    def bad_reset(kind: ResetType) -> None:
        raise RuntimeError("reset bug")

    ctx.setup_dma(bad_map, dev.on_unmap)
    ctx.setup_reset(bad_reset)
    fd = memfd_with_pattern(0x1000)
    try:
        client.dma_map(0x300000, 0x1000, fd=fd)  # void callback: the map itself stands
    finally:
        os.close(fd)
    assert "map bug" in caplog.text
    with pytest.raises(VfioUserError) as info:
        client.reset()
    assert info.value.errno == errno.EIO
    client.dma_unmap(0x300000, 0x1000)
    assert dev.unmaps == dev.maps  # the very object on_map saw
