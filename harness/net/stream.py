"""The test stream and UDP datagram schedule, bit-identical to guest/src/stream.h.

Stream: little-endian uint64 words ``w[n] = splitmix64(seed + n)`` (docs/DESIGN.md).
UDP schedule: with ``u = seed ^ UDP_SEED_XOR``, datagram ``i`` has size
``1 + splitmix64(u + 2**63 + i) % 1472`` and carries stream(u) bytes ``[i*1472, i*1472 + size)``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
UDP_MAX_PAYLOAD = 1472
UDP_SEED_XOR = 0x5544505F53434844  # "UDP_SCHD": keeps UDP data distinct from the TCP stream
UDP_SIZE_BASE = 1 << 63  # sizes come from a far-away part of the UDP stream

U64 = npt.NDArray[np.uint64]


def splitmix64(x: int) -> int:
    """Scalar reference splitmix64 (mod 2**64)."""
    z = (x + GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _mix(z: U64) -> U64:
    """splitmix64's finaliser applied in place to ``x + GAMMA`` values (uint64 wraps)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def stream_words(seed: int, first: int, count: int) -> U64:
    """Words ``w[first] .. w[first + count - 1]`` of the stream for ``seed``."""
    start = (seed + first + GAMMA) & MASK64
    # arange in uint64 wraps modulo 2**64 as the C side does; adding the start as a
    # uint64 scalar avoids numpy promoting the large Python int to float/object.
    z = np.arange(count, dtype=np.uint64)
    z += np.uint64(start)
    return _mix(z)


def stream_bytes(seed: int, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of the stream for ``seed``."""
    return stream_array(seed, offset, length).tobytes()


def stream_array(seed: int, offset: int, length: int) -> npt.NDArray[np.uint8]:
    """Like :func:`stream_bytes` but as a uint8 array (no copy for verification)."""
    if length <= 0:
        return np.zeros(0, dtype=np.uint8)
    first = offset >> 3
    last = (offset + length + 7) >> 3
    words = stream_words(seed, first, last - first).astype("<u8", copy=False)
    skip = offset & 7
    return words.view(np.uint8)[skip : skip + length]


def first_mismatch(seed: int, offset: int, data: bytes | bytearray | memoryview) -> int | None:
    """Index into ``data`` of the first byte differing from the stream at ``offset``, or None."""
    got = np.frombuffer(data, dtype=np.uint8)
    if got.size == 0:
        return None
    diff = got != stream_array(seed, offset, got.size)
    if not diff.any():
        return None
    return int(np.argmax(diff))


def udp_seed(seed: int) -> int:
    """The stream seed the UDP schedule draws from."""
    return (seed ^ UDP_SEED_XOR) & MASK64


def udp_size(seed: int, index: int) -> int:
    """Size in bytes (1..1472) of datagram ``index``."""
    return 1 + splitmix64((udp_seed(seed) + UDP_SIZE_BASE + index) & MASK64) % UDP_MAX_PAYLOAD


def udp_payload(seed: int, index: int) -> bytes:
    """The exact payload of datagram ``index``."""
    return stream_bytes(udp_seed(seed), index * UDP_MAX_PAYLOAD, udp_size(seed, index))


def udp_sizes(seed: int, count: int) -> list[int]:
    """Sizes of datagrams ``0 .. count - 1`` (vectorised)."""
    words = stream_words(udp_seed(seed), UDP_SIZE_BASE, count)
    return [int(x) for x in (words % np.uint64(UDP_MAX_PAYLOAD)) + np.uint64(1)]
