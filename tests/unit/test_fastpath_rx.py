"""The C RX burst (harness.virtio.fastpath) against the Python RX path: the same visible result.

Two net devices over identical guest memory and identical RX rings, one with the C burst, one
with it off, each reading frames from a real fd as from a TAP. Hypothesis draws the features
(MRG_RXBUF, GUEST_CSUM, GUEST_TSO4/6), the RX chains (plausible writable buffers, and hostile
descriptors: device-readable, INDIRECT, in read-only, unmappable or absent memory, too short for
a vnet header, NEXT loops, heads out of range, avail jumps) and the frames (runts, oversize
frames, every gso_type with and without ECN, NEEDS_CSUM with offsets that fit and do not, stray
flag bits). Both devices must leave the same used ring and the same bytes in the guest's
buffers, count the same packets, bytes, drops, header and oversize drops and finished
checksums, break the queue (or not) the same way, and report the same DMA violations. What
legitimately differs: the Python pool keeps unused chains popped and mapped between events, the
C burst leaves them in the ring, so ``outstanding``, ``last_avail`` and the ledger's map counts
are not compared.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.testing.mockdriver import FdBackend, NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES, OFFLOAD_FEATURES

P = 0x1000
END = 0x100000 + (1 << 20)  # the end of MockMemory's region
RO = END + 4 * P  # read-only: the device may not write there
NOVIEW = END + 8 * P  # registered, no host memory for the device
GAP = END + 12 * P
QSIZE = 16
_N, _W, _I = C.DESC_F_NEXT, C.DESC_F_WRITE, C.DESC_F_INDIRECT
_HDR = struct.Struct("<BBHHHHH")


def _rig(fast: bool, driver_features: int) -> NetRig:
    r = net_rig(ledger=True, backend=FdBackend(), bursts=True, queue_size=QSIZE, mem_size=1 << 20,
                features=DEFAULT_FEATURES | OFFLOAD_FEATURES,
                driver_features=driver_features)  # fmt: skip
    mem = r.driver.mem.memory
    mem.add_region(RO, memoryview(bytearray(P)), writable=False)
    mem.add_region(NOVIEW, None, writable=True, size=P)
    if not fast:
        r.device.fastpath = None
    assert (r.device.fastpath is not None) == fast
    return r


def _observe(r: NetRig, data_at: int) -> dict[str, Any]:
    assert r.ledger is not None
    q = r.device.queues[0]
    dev = r.device
    return {
        "used": r.driver.mem.read(r.rx.used, 4 + 8 * QSIZE),
        "buffers": r.driver.mem.read(data_at, 8 * P),
        "stats": {k: getattr(q.stats, k) for k in q.stats.__slots__},
        "broken": q.broken,
        "status": dev.status,
        "device": (dev.header_drops, dev.oversize_drops, dev.csum_completed),
        "starved": list(dev._rx_starved),
        "violations": r.ledger.stats()["violations"],
    }


_HOSTILE_ADDRS = st.sampled_from([END - 8, RO, RO + P - 2, NOVIEW, GAP, 0, (1 << 64) - 8])


Ring = tuple[list[tuple[int, int, int, int]], list[int], int]


@st.composite
def _ring(draw: st.DrawFn, data_at: int) -> Ring:
    """A descriptor table: one- or two-buffer writable chains in the data area, with hostile
    descriptors among them in half the rings (a whole ring of good chains gets frames far
    enough to reach the header and room rules)."""
    out = []
    hostile = draw(st.booleans())
    for k in range(QSIZE):
        if not hostile or draw(st.integers(0, 4)):
            flags = _W | draw(st.sampled_from([0, 0, _N]))
            addr = data_at + draw(st.integers(0, 7 * P))
            length = draw(st.sampled_from([12, 64, 1526, 2048]) | st.integers(1, 3000))
            out.append((addr, length, flags, (k + 1) % QSIZE))
        else:
            flags = sum(draw(st.sets(st.sampled_from([_N, _W, _I]))))
            addr = draw(_HOSTILE_ADDRS | st.integers(data_at, data_at + 8 * P))
            length = draw(st.sampled_from([0, 4, 12, 0xFFFFFFFF]) | st.integers(1, 3000))
            out.append((addr, length, flags, draw(st.integers(0, QSIZE + 2))))
    top = QSIZE + 1 if hostile else QSIZE - 1
    heads = draw(st.lists(st.integers(0, top), min_size=QSIZE, max_size=QSIZE))
    avail = draw(st.integers(0, QSIZE) | st.sampled_from([QSIZE + 1, 0x8000]) if hostile
                 else st.integers(1, QSIZE))  # fmt: skip
    return out, heads, avail


@st.composite
def _frame(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return bytes(draw(st.integers(0, 11)))  # a runt
    flags = draw(st.sampled_from([0, 0, 1, 2, 3, 4, 0x80]))
    gso = draw(st.sampled_from([0, 0, 0, 1, 3, 4, 5, 0x81, 0x84]))
    payload = draw(st.integers(14, 1600) | st.integers(1600, 3200))
    start = draw(st.integers(0, payload + 4))
    offset = draw(st.sampled_from([0, 2, 6, 16, 3]))
    head = _HDR.pack(flags, gso, 0, 0, start, offset, 0)
    return head + bytes((i * 13 + payload) & 0xFF for i in range(payload))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), mrg=st.booleans(), csum=st.booleans(), tso=st.booleans(),
       frames=st.lists(_frame(), max_size=12), events=st.integers(1, 3))
def test_the_burst_and_the_python_path_agree_on_hostile_rings_and_frames(
    data: st.DataObject, mrg: bool, csum: bool, tso: bool, frames: list[bytes], events: int,
) -> None:  # fmt: skip
    features = DEFAULT_FEATURES & ~(0 if mrg else 1 << C.NET_F_MRG_RXBUF)
    if csum:
        features |= 1 << C.NET_F_GUEST_CSUM
    if tso:
        features |= 1 << C.NET_F_GUEST_CSUM | 1 << C.NET_F_GUEST_TSO4 | 1 << C.NET_F_GUEST_TSO6
    sides = [_rig(fast, features) for fast in (True, False)]
    ats = [s.driver.mem.alloc(8 * P, align=P) for s in sides]
    assert ats[0] == ats[1]
    ring, heads, avail = data.draw(_ring(ats[0]))
    seen = []
    for r in sides:
        r.rx.write_ring(ring, heads, avail)
        backend = r.backend
        assert isinstance(backend, FdBackend)
        per = -(-len(frames) // events) if frames else 0
        for e in range(events):
            for f in frames[e * per:(e + 1) * per]:
                backend.deliver(f)
            r.device.on_backend_readable()
        seen.append(_observe(r, ats[0]))
    assert seen[0] == seen[1]


def _post_rx(r: NetRig, sizes: list[int]) -> None:
    for n in sizes:
        r.rx.add(in_=[n])


def _both(features: int, post: Any, frames: list[bytes]) -> list[tuple[Any, ...]]:
    seen = []
    for on in (True, False):
        r = _rig(on, features)
        post(r)
        backend = r.backend
        assert isinstance(backend, FdBackend)
        for f in frames:
            backend.deliver(f)
        r.device.on_backend_readable()
        used = r.rx.get_used()
        q = r.device.queues[0]
        assert r.ledger is not None
        seen.append((used, [r.rx.written(h, n) for h, n in used], q.broken,
                     r.device.csum_completed, r.ledger.stats()["violations"],
                     None if r.device.fastpath is None else r.device.fastpath.rx_frames))
    return seen


def test_frames_are_received_in_c_byte_exact() -> None:
    """Mergeable 512-byte buffers, frames from 60 bytes to three buffers long: all in C, the
    used lengths right, the same buffers and bytes as the Python path."""
    frames = [_HDR.pack(0, 0, 0, 0, 0, 0, 0) + bytes((i + n) & 0xFF for i in range(n))
              for n in (60, 1514, 1000, 61, 500)]  # fmt: skip
    seen = _both(DEFAULT_FEATURES, lambda r: _post_rx(r, [512] * 12), frames)
    assert seen[0][:5] == seen[1][:5]
    assert seen[0][5] == 5
    assert [n for _, n in seen[0][0]] == [72, 512, 512, 502, 512, 500, 73, 512]
    assert b"".join(seen[0][1]) == b"".join(
        f[:10] + bytes([k, 0]) + f[12:] for f, k in zip(frames, (1, 3, 2, 1, 1), strict=True))


def test_a_refused_chain_ends_the_burst_and_the_python_path_breaks_the_queue() -> None:
    """A device-readable RX buffer after a good chain: the first frame in C, then the Python
    path refuses the chain in its own words (NEEDS_RESET), on both sides alike."""
    seen = []
    for on in (True, False):
        r = _rig(on, DEFAULT_FEATURES & ~(1 << C.NET_F_MRG_RXBUF))
        _post_rx(r, [1526])
        r.rx.add(out=[bytes(64)])
        backend = r.backend
        assert isinstance(backend, FdBackend)
        for _ in range(2):
            backend.deliver(_HDR.pack(0, 0, 0, 0, 0, 0, 0) + bytes(60))
        r.device.on_backend_readable()
        q = r.device.queues[0]
        seen.append((r.rx.get_used(), q.broken, q.stats.packets, r.device.status))
        if on:
            assert r.device.fastpath is not None and r.device.fastpath.rx_frames == 1
    assert seen[0] == seen[1]
    assert seen[0][1] and seen[0][3] & C.STATUS_NEEDS_RESET



def test_a_partial_checksum_is_finished_in_c_as_in_python() -> None:
    """NEEDS_CSUM for a driver without GUEST_CSUM: the burst finishes the checksum (a long
    frame, so the sum needs folding; an odd length) and clears the flag, byte for byte as
    rxhdr.finish_csum does."""
    payload = bytes((i * 151 + 7) & 0xFF for i in range(1401))
    frame = _HDR.pack(1, 0, 0, 0, 34, 16, 0) + payload
    seen = _both(DEFAULT_FEATURES, lambda r: _post_rx(r, [2048] * 4), [frame])
    assert seen[0][:5] == seen[1][:5]
    assert seen[0][3] == 1 and seen[0][5] == 1
    written = seen[0][1][0]
    assert written[0] == 0 and written[12 + 34 + 16: 12 + 34 + 18] != payload[50:52]


def test_a_buffer_in_read_only_memory_is_the_python_paths_to_refuse() -> None:
    def post(r: NetRig) -> None:
        (i,) = r.rx._take(1)
        r.rx.write_desc(i, RO, 2048, _W, 0)
        r.rx.publish(i)

    seen = _both(DEFAULT_FEATURES, post, [_HDR.pack(0, 0, 0, 0, 0, 0, 0) + bytes(60)])
    assert seen[0][:5] == seen[1][:5]
    assert seen[0][2] and seen[0][4] == {"read_only_region": 1} and seen[0][5] == 0


def test_a_room_of_more_than_1024_buffers_is_the_python_paths() -> None:
    """A 2048-entry queue of 40-byte buffers and a driver with guest TSO (room for 64 KiB takes
    1640 of them): more than one readv takes (IOV_MAX 1024, EINVAL beyond: the frame would
    never leave the TAP). The burst leaves it to the Python path, which gathers 1024 buffers
    and receives into them; both devices end the same."""
    features = DEFAULT_FEATURES | OFFLOAD_FEATURES
    seen = []
    for on in (True, False):
        r = net_rig(ledger=True, backend=FdBackend(), bursts=True, queue_size=2048,
                    mem_size=1 << 20, features=features, driver_features=features)  # fmt: skip
        if not on:
            r.device.fastpath = None
        for _ in range(2000):
            r.rx.add(in_=[40])
        backend = r.backend
        assert isinstance(backend, FdBackend)
        backend.deliver(_HDR.pack(0, 0, 0, 0, 0, 0, 0) + bytes(range(100)))
        r.device.on_backend_readable()
        used = r.rx.get_used()
        q = r.device.queues[0]
        seen.append((used, [r.rx.written(h, n) for h, n in used], q.broken, r.device.status))
        if on:
            assert r.device.fastpath is not None and r.device.fastpath.rx_frames == 0
        assert backend.read_errors == 0
    assert seen[0] == seen[1]
    assert [n for _, n in seen[0][0]] == [40, 40, 32] and not seen[0][2]
