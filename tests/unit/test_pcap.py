"""Packet capture (harness.net.pcap): the pcapng files as Debian's real tshark reads them back."""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import logging
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.net.pcap import (
    VNET_HDR_LEN,
    CapturingBackend,
    Direction,
    PcapngWriter,
    ethernet_views,
)
from harness.testing.mockdriver import FakeBackend, NetRig, net_rig
from harness.virtio.net import DEFAULT_FEATURES, OFFLOAD_FEATURES

IN = Direction.INBOUND
OUT = Direction.OUTBOUND
#: epb_flags bits 0-1 as the pcapng spec numbers them (what tshark shows), not our enum.
PCAPNG_DIRECTION = {IN: 0b01, OUT: 0b10}
#: Ethernet frame sizes: 1 byte of payload after the MAC header up to a 64 KiB GSO frame.
SIZES = (15, 1, 60, 61, 1514, 4097, 9014, 65535 + 18)


@dataclass(frozen=True)
class Seen:
    """One packet as tshark reports it."""

    direction: int
    data: bytes
    time_ns: int


def tshark_read(path: Path) -> list[Seen]:
    """Every packet of ``path``, in file order, through `tshark -T json -x`."""
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark not installed (apt-get install tshark; `make deps` installs it)")
    cp = subprocess.run([tshark, "-r", str(path), "-T", "json", "-x"],
                        capture_output=True, text=True, check=False)
    assert cp.returncode == 0, cp.stderr
    out = []
    for packet in json.loads(cp.stdout):
        layers = packet["_source"]["layers"]
        frame = dict(_flatten(layers["frame"]))
        # frame_raw is absent for an empty frame.
        data = bytes.fromhex(layers["frame_raw"][0]) if "frame_raw" in layers else b""
        assert frame["frame.interface_name"] == "virtio-net0"
        assert frame["frame.encap_type"] == "1"  # Ethernet
        assert int(frame["frame.len"]) == int(frame["frame.cap_len"]) == len(data)
        sec, _, frac = frame["frame.time_epoch"].partition(".")
        out.append(Seen(int(frame["frame.packet_flags_direction"], 16), data,
                        int(sec) * 10**9 + int(frac.ljust(9, "0"))))
    return out


def _flatten(tree: dict[str, object]) -> Iterator[tuple[str, str]]:
    """Field name -> shown value, whatever subtree tshark nests a field in."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value)
        elif isinstance(value, str):
            yield key, value


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def vnet_hdr(seed: int) -> bytes:
    # Not a plausible header on purpose: every byte differs from the frame's, so a capture that
    # keeps any of it shows up.
    return bytes(0xA0 + (seed + i) % 16 for i in range(VNET_HDR_LEN))


def split(data: bytes, cuts: Sequence[int]) -> list[memoryview]:
    """``data`` as views ending at each of ``cuts`` (any order; offsets outside are ignored)."""
    edges = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    view = memoryview(bytearray(data))
    return [view[a:b] for a, b in itertools.pairwise(edges)]


@contextlib.contextmanager
def capture(path: Path) -> Iterator[CapturingBackend[FakeBackend]]:
    backend = CapturingBackend(FakeBackend(), PcapngWriter.open(path))
    try:
        yield backend
    finally:
        backend.close()


# ---- the writer -------------------------------------------------------------------------------


def test_writer_frames_read_back_whole_in_order_with_direction(tmp_path: Path) -> None:
    path = tmp_path / "w.pcapng"
    t0, step = 1_700_000_000_123_456_789, 1_000_001  # ts high/low must be split right
    stamps = iter(range(t0, 1 << 63, step))
    expect = []
    with PcapngWriter(open(path, "wb"), clock=lambda: next(stamps)) as w:
        for i, n in enumerate([*SIZES, 0]):
            data = payload(n, i)
            direction = (IN, OUT)[i % 2]
            w.write(split(data, [1, 14, n // 2]), direction)
            expect.append(Seen(PCAPNG_DIRECTION[direction], data, t0 + i * step))
    assert tshark_read(path) == expect


def test_writer_headers_declare_ethernet_nanoseconds_unlimited_snaplen(tmp_path: Path) -> None:
    path = tmp_path / "h.pcapng"
    PcapngWriter.open(path).close()
    raw = path.read_bytes()
    # SHB (type, length, byte-order magic), then the IDB: link type 1, snaplen 0 (no limit).
    shb_type, shb_len, magic = struct.unpack_from("<III", raw)
    assert (shb_type, magic) == (0x0A0D0D0A, 0x1A2B3C4D)
    assert struct.unpack_from("<IIHHI", raw, shb_len) == (1, len(raw) - shb_len, 1, 0, 0)
    # Options: if_name, then if_tsresol = 9 (nanoseconds).
    assert raw[shb_len + 16 :].startswith(struct.pack("<HH", 2, 11) + b"virtio-net0\0"
                                          + struct.pack("<HHB", 9, 1, 9))
    assert tshark_read(path) == []  # a capture without frames is still a valid file


def test_writer_flushes_at_most_once_a_second_and_never_per_frame(tmp_path: Path) -> None:
    path = tmp_path / "f.pcapng"
    now = [0.0]
    w = PcapngWriter(open(path, "wb", buffering=1 << 20), monotonic=lambda: now[0])  # noqa: SIM115
    try:
        now[0] = 0.5
        w.write([memoryview(b"a" * 60)], OUT)
        assert path.stat().st_size == 0  # still buffered
        now[0] = 1.0
        w.write([memoryview(b"b" * 60)], IN)
        assert [s.data for s in tshark_read(path)] == [b"a" * 60, b"b" * 60]  # while open
        now[0] = 1.5
        w.write([memoryview(b"c" * 60)], IN)
        assert len(tshark_read(path)) == 2
    finally:
        w.close()
    assert len(tshark_read(path)) == 3
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.write([memoryview(b"late")], IN)


# ---- the header strip ---------------------------------------------------------------------------


@pytest.mark.parametrize("cuts", [[], [5], [12], [11, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                                  [3, 40], [12, 13, 14]])
@pytest.mark.parametrize("length", [12, 13, 40, 100])
def test_ethernet_views_drop_the_header_wherever_views_split(cuts: list[int], length: int) -> None:
    frame = vnet_hdr(0) + payload(88, 1)  # 100 bytes; views may hold more than the frame
    views = split(frame + b"\xee" * 50, cuts)
    assert b"".join(ethernet_views(views, length)) == frame[VNET_HDR_LEN:length]


# ---- the backend wrapper -----------------------------------------------------------------------


def test_capturing_backend_records_both_directions_header_stripped(tmp_path: Path) -> None:
    path = tmp_path / "b.pcapng"
    expect = []
    with capture(path) as cap:
        inner = cap.inner
        for i, n in enumerate(SIZES):
            eth = payload(n, 100 + i)
            frame = vnet_hdr(i) + eth
            # Outbound: the guest's chain, split inside the header and inside the frame.
            cap.writev(split(frame, [5, 11, 12 + n // 3]))
            assert inner.tx[-1] == frame  # forwarded unchanged
            expect.append(Seen(0b10, eth, 0))
            # Inbound: RX buffers (first ones smaller than the header) hold more than the
            # frame; what lies past the returned length is stale and must not be captured.
            inner.rx.append(frame)
            rx_bufs = split(b"\xee" * 70000, [7, 10, 2048, 2048 + 4096])
            assert cap.readv(rx_bufs) == len(frame)
            expect.append(Seen(0b01, eth, 0))
        # Nothing waiting (0) and a runt the device drops (< header): nothing captured.
        assert cap.readv([memoryview(bytearray(64))]) == 0
        inner.rx.append(b"\x01" * 8)
        assert cap.readv([memoryview(bytearray(64))]) == 8
        assert cap.stats() == {"frames": len(expect), "bytes": 2 * sum(SIZES), "error": None}
    seen = tshark_read(path)
    assert [(s.direction, s.data) for s in seen] == [(e.direction, e.data) for e in expect]
    assert all(a.time_ns <= b.time_ns for a, b in itertools.pairwise(seen))


def test_frames_through_the_real_device_are_captured(tmp_path: Path) -> None:
    """The virtio-net device, driven by the mock driver: what the guest sent and what it was
    delivered (mergeable buffers, a 64 KiB GSO frame over 17 of them) is what tshark sees."""
    path = tmp_path / "d.pcapng"
    r: NetRig = net_rig(features=DEFAULT_FEATURES | OFFLOAD_FEATURES)
    cap = CapturingBackend(r.backend, PcapngWriter.open(path))
    r.device.backend = cap
    tx = [payload(n, 200 + n) for n in (60, 1514, 65535 + 18 - VNET_HDR_LEN)]
    rx = [payload(n, 300 + n) for n in (1, 1514, 65535 + 18)]
    try:
        for i, eth in enumerate(tx):
            frame = vnet_hdr(i) + eth
            r.tx.add(list(map(bytes, split(frame, [6, 20, 4096]))))
        r.tx.kick()
        r.device.process()
        assert r.backend.tx == [vnet_hdr(i) + eth for i, eth in enumerate(tx)]
        for _ in range(40):
            r.rx.add(in_=[4096])
        r.rx.kick()
        r.device.process()
        # RX: flags NEEDS_CSUM and gso_type TCPV4 (the device drops a gso_type the driver did
        # not negotiate, virtio 1.3 5.1.6.4.1); the other bytes stay implausible.
        rx_hdr = bytes([1, 1]) + vnet_hdr(7)[2:]
        r.backend.rx.extend(rx_hdr + eth for eth in rx)
        r.device.on_backend_readable()
        assert not r.backend.rx  # all delivered
        assert sum(n for _, n in r.rx.get_used()) == sum(len(e) + VNET_HDR_LEN for e in rx)
    finally:
        cap.close()
    seen = [(s.direction, s.data) for s in tshark_read(path)]
    assert seen == [(0b10, e) for e in tx] + [(0b01, e) for e in rx]  # outbound, inbound


class FillingDisk(io.BytesIO):
    """A capture file that runs out of space when told to."""

    full = False

    def write(self, data: Any, /) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_capture_failure_stops_capture_not_traffic(caplog: pytest.LogCaptureFixture) -> None:
    disk = FillingDisk()
    cap = CapturingBackend(FakeBackend(), PcapngWriter(disk))
    frame = vnet_hdr(0) + payload(60, 0)
    cap.writev([memoryview(frame)])
    disk.full = True
    with caplog.at_level(logging.ERROR, logger="harness.net.pcap"):
        cap.writev([memoryview(frame)])
        cap.writev([memoryview(frame)])
        cap.inner.rx.append(frame)
        assert cap.readv([memoryview(bytearray(100))]) == len(frame)
    assert cap.inner.tx == [frame] * 3
    assert cap.stats() == {"frames": 1, "bytes": 60, "error": "[Errno 28] No space left on device"}
    assert len(caplog.records) == 1  # logged once, then quiet


# ---- the server option --------------------------------------------------------------------------


def test_server_option(capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main as harness_main
    from harness.server.cli import parse_args

    cfg, _ = parse_args(["--socket", "s.sock", "--pcap", "run.pcapng"])
    assert cfg.pcap == Path("run.pcapng")
    assert parse_args(["--socket", "s.sock"])[0].pcap is None
    with pytest.raises(SystemExit) as exc:  # `harness serve` hands its options to that parser
        harness_main(["serve", "--help"])
    assert exc.value.code == 0
    assert "--pcap" in capsys.readouterr().out
