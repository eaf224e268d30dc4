"""The numpy stream and UDP schedule agree with known vectors and with the C implementation."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from harness.net import stream

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "guest" / "src" / "hnet.c"


def test_splitmix64_known_vectors() -> None:
    # Reference values of splitmix64 as published with the algorithm (state 0 then +gamma).
    assert stream.splitmix64(0) == 0xE220A8397B1DCDAF
    assert stream.splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert stream.splitmix64(2 * 0x9E3779B97F4A7C15 % 2**64) == 0x06C45D188009454F


def test_stream_words_match_scalar() -> None:
    seed = 0xFFFF_FFFF_FFFF_FFF0  # seed + n wraps past 2**64 inside the block
    words = stream.stream_words(seed, 5, 40)
    assert [int(w) for w in words] == [stream.splitmix64((seed + 5 + i) % 2**64) for i in range(40)]


def test_stream_bytes_little_endian_words() -> None:
    data = stream.stream_bytes(3, 0, 64)
    assert data == b"".join(struct.pack("<Q", stream.splitmix64(3 + n)) for n in range(8))


@pytest.mark.parametrize("offset", [0, 1, 7, 8, 9, 4093])
@pytest.mark.parametrize("length", [0, 1, 5, 8, 17, 1000])
def test_unaligned_slices_agree(offset: int, length: int) -> None:
    whole = stream.stream_bytes(11, 0, 6000)
    assert stream.stream_bytes(11, offset, length) == whole[offset : offset + length]


def test_first_mismatch() -> None:
    data = bytearray(stream.stream_bytes(9, 100, 5000))
    assert stream.first_mismatch(9, 100, data) is None
    data[1234] ^= 0x40
    assert stream.first_mismatch(9, 100, data) == 1234
    assert stream.first_mismatch(9, 100, b"") is None


def test_udp_schedule_shape() -> None:
    sizes = stream.udp_sizes(1, 1000)
    assert sizes == [stream.udp_size(1, i) for i in range(1000)]
    assert min(sizes) >= 1 and max(sizes) <= stream.UDP_MAX_PAYLOAD
    assert max(sizes) > 1400 and min(sizes) < 50  # the schedule really spans the range
    p0, p1 = stream.udp_payload(1, 0), stream.udp_payload(1, 1)
    assert len(p0) == sizes[0] and len(p1) == sizes[1]
    # UDP data must not repeat the TCP stream of the same seed.
    assert p0 != stream.stream_bytes(1, 0, len(p0))


@pytest.fixture(scope="module")
def hnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed: cannot cross-check against the C stream")
    out = tmp_path_factory.mktemp("hnet") / "hnet"
    subprocess.run(["gcc", "-Wall", "-Wextra", "-O2", "-o", str(out), str(SRC)], check=True)
    return out


@pytest.mark.parametrize(
    ("seed", "offset", "length"),
    [(0, 0, 64), (1, 3, 100_003), (2**64 - 1, 2**40 + 5, 777), (0xDEADBEEF, 262_141, 300_000)],
)
def test_c_stream_matches(hnet: Path, seed: int, offset: int, length: int) -> None:
    argv = [str(hnet), "stream", "--seed", str(seed), "--offset", str(offset)]
    out = subprocess.run([*argv, "--bytes", str(length)], capture_output=True, check=True).stdout
    assert out == stream.stream_bytes(seed, offset, length)


@pytest.mark.parametrize("seed", [1, 0x123456789ABCDEF0])
def test_c_udp_schedule_matches(hnet: Path, seed: int) -> None:
    argv = [str(hnet), "udp-schedule", "--seed", str(seed), "--count", "300"]
    out = subprocess.run(argv, capture_output=True, check=True).stdout
    pos = 0
    for i in range(300):
        (size,) = struct.unpack_from("<H", out, pos)
        assert size == stream.udp_size(seed, i)
        assert out[pos + 2 : pos + 2 + size] == stream.udp_payload(seed, i)
        pos += 2 + size
    assert pos == len(out)
