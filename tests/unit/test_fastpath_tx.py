"""The C TX burst (harness.virtio.fastpath) against the Python TX path: the same visible result.

Two net devices over identical guest memory and identical TX rings, one with the C burst, one
with it switched off (the Python path alone), each writing frames to a real fd as a TAP is
written. Hypothesis writes the same hostile descriptor table and avail ring into both: addresses
at and across region edges, in read-only, unmappable and absent memory, lengths from 0 to past
TX_MAX and 2^32, WRITE and INDIRECT descriptors, NEXT loops, heads and next out of range, avail
jumps, Bus Master Enable off. Both must put the same frames on the wire, the same used ring in
guest memory, the same queue counters, device status and ledger counters. Hand-made rings check
that valid chains really are taken in C and that the table of guest regions never outlives a
region.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.dma import DirectMapOps
from harness.testing.mockdriver import FdBackend, NetRig, net_rig
from harness.vfu.bursts import CBursts
from harness.virtio import constants as C
from harness.virtio.fastpath import FastPath, fast_path
from harness.virtio.netdefs import DEFAULT_FEATURES, FAST_RX_ENV, FAST_TX_ENV, TX_MAX

P = 0x1000
BASE = 0x100000  # MockMemory's region: [BASE, END), rings and the data area inside
END = BASE + (1 << 20)
ADJ = END  # adjacent writable region: a buffer across END is split in two
RO = END + 4 * P  # read-only: fine to transmit from
NOVIEW = END + 8 * P  # registered, no host memory for the device
GAP = END + 12 * P  # nothing
SPLIT = END + 16 * P  # two regions over one host buffer (one test's)
QSIZE = 16
MAX_MAP = 0x600  # small, so long buffers are split by max_mapping_size too
_DESC = struct.Struct("<QIHH")
_N, _W, _I = C.DESC_F_NEXT, C.DESC_F_WRITE, C.DESC_F_INDIRECT


def _rig(fast: bool, *, indirect: bool = False) -> NetRig:
    """``indirect``: VIRTIO_F_INDIRECT_DESC offered and negotiated (as QEMU's guests do)."""
    features = DEFAULT_FEATURES | (1 << C.F_INDIRECT_DESC if indirect else 0)
    r = net_rig(ledger=True, backend=FdBackend(), bursts=True, queue_size=QSIZE, mem_size=1 << 20,
                features=features)  # fmt: skip
    mem = r.driver.mem
    pattern = bytes(range(256)) * 16
    mem.memory.add_region(ADJ, memoryview(bytearray(pattern[: 2 * P])), writable=True)
    mem.memory.add_region(RO, memoryview(bytearray(pattern[:P])), writable=False)
    mem.memory.add_region(NOVIEW, None, writable=True, size=P)
    assert r.ledger is not None and type(r.ledger.inner) is DirectMapOps
    r.ledger.inner._max = MAX_MAP
    # Built again: the map ops' max_mapping_size is read when the fast path is made.
    r.device.fastpath = fast_path(r.device.mapops, CBursts()) if fast else None
    assert (r.device.fastpath is not None) == fast
    return r


def _data(r: NetRig) -> int:
    """A 16 KiB data area in the main region, filled with a pattern; its IOVA."""
    at = r.driver.mem.alloc(4 * P, align=P)
    r.driver.mem.write(at, bytes((i * 7 + 3) & 0xFF for i in range(4 * P)))
    return at


def _observe(r: NetRig) -> dict[str, Any]:
    assert r.ledger is not None
    q = r.device.queues[1]
    s = r.ledger.stats()
    backend = r.backend
    assert isinstance(backend, FdBackend)
    return {
        "frames": backend.frames(),
        "write_errors": backend.write_errors,
        "used": r.driver.mem.read(r.tx.used, 4 + 8 * QSIZE),
        "stats": {k: getattr(q.stats, k) for k in q.stats.__slots__},
        "state": q.ring_state(),
        "status": r.device.status,
        "ledger": {k: s[k] for k in ("maps", "unmaps", "map_bytes", "live", "peak_live",
                                     "violations", "failed_maps")},
    }


_ADDRS = st.one_of(
    st.sampled_from([END - 8, END - 1, ADJ + 2 * P - 4, RO, RO + P - 2, NOVIEW, GAP, 0,
                     (1 << 64) - 8, BASE]),
    st.integers(END - 2 * P, ADJ + 2 * P),
    st.integers(0, (1 << 64) - 1),
)
_LENS = st.one_of(st.integers(0, 3 * MAX_MAP), st.sampled_from(
    [0, 11, 12, 13, 0x10000, TX_MAX - 40, TX_MAX + 1, 0xFFFFFFFF, 0x80000000]))


def _itable_at(data_at: int) -> int:
    """Where the hypothesis test writes an indirect table: the data area's last page (and the
    same table across the main region's end into ADJ)."""
    return data_at + 3 * P


ITABLE_N = 6  # descriptors in the hypothesis test's indirect table
AT = -1  # stands for the table's address in the data area
_ITABLE_ADDRS = st.sampled_from([AT] * 5 + [END - 32, RO, NOVIEW, GAP])


@st.composite
def _itable(draw: st.DrawFn, data_at: int) -> list[tuple[int, int, int, int]]:
    """An indirect table's descriptors: a plausible chain of buffers in the data area, often
    with one hostile change (nested INDIRECT, WRITE, a next out of range or looping back, a
    long or absent buffer)."""
    out: list[list[int]] = []
    for k in range(ITABLE_N):
        addr = data_at + draw(st.integers(0, 2 * P))
        out.append([addr, draw(st.integers(0, 0x300)), _N, k + 1])
    out[-1][2] = 0
    if draw(st.booleans()):
        k = draw(st.integers(0, ITABLE_N - 1))
        field, value = draw(st.sampled_from([
            (2, _I), (2, _N | _I), (2, _W), (2, _N | _W), (3, 0), (3, ITABLE_N), (3, 0xFFFF),
            (1, TX_MAX + 1), (0, GAP), (0, NOVIEW)]))  # fmt: skip
        out[k][field] = value if field != 2 else value | (out[k][2] & _N)
    return [(a, n, f, x) for a, n, f, x in out]


@st.composite
def _table(draw: st.DrawFn, data_at: int) -> list[tuple[int, int, int, int]]:
    out = []
    itable = _itable_at(data_at)
    for k in range(QSIZE):
        if not draw(st.integers(0, 3)):
            # Through the indirect table, whole or in part; or a table elsewhere: across a
            # region edge, read-only, unmappable, absent; a bad length; NEXT or WRITE on it.
            where = draw(_ITABLE_ADDRS)
            addr = itable if where == AT else where
            length = 16 * draw(st.integers(1, ITABLE_N))
            length = draw(st.sampled_from([length] * 6 + [0, 24, 16 * 0x10001]))
            out.append((addr, length, _I | draw(st.sampled_from([0, 0, 0, 0, _N, _W])), k + 1))
        elif draw(st.integers(0, 2)):
            # Plausible: a buffer in the data area, NEXT to the following descriptor or not;
            # mostly these, so chains get long enough to reach the rules further along.
            flags = draw(st.sampled_from([0, 0, _N, _N, _W]))
            addr = data_at + draw(st.integers(0, 3 * P))
            out.append((addr, draw(st.integers(1, 0x300)), flags, (k + 1) % QSIZE))
        else:
            flags = sum(draw(st.sets(st.sampled_from([_N, _W, _I]))))
            out.append((draw(_ADDRS), draw(_LENS), flags, draw(st.integers(0, QSIZE + 2))))
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data(), bme=st.booleans(),
       heads=st.lists(st.integers(0, QSIZE + 1), min_size=QSIZE, max_size=QSIZE),
       avail=st.one_of(st.integers(0, QSIZE), st.sampled_from([QSIZE + 1, 0x8000])))
def test_the_burst_and_the_python_path_agree_on_hostile_rings(
    data: st.DataObject, bme: bool, heads: list[int], avail: int
) -> None:
    indirect = data.draw(st.booleans())
    sides = [_rig(fast, indirect=indirect) for fast in (True, False)]
    at = _data(sides[0])
    assert _data(sides[1]) == at
    table = data.draw(_table(at))
    itable = b"".join(_DESC.pack(*d) for d in data.draw(_itable(at)))
    seen = []
    for r in sides:
        r.driver.mem.write(_itable_at(at), itable)
        r.driver.mem.write(END - 32, itable[:32])  # the same table across the region edge
        r.driver.mem.memory.view(ADJ, len(itable) - 32, write=True)[:] = itable[32:]
        r.tx.write_ring(table, heads, avail)
        r.bus_master[0] = bme
        r.tx.kick()
        r.device.process()
        seen.append(_observe(r))
    assert seen[0] == seen[1]


def _chain(r: NetRig, pieces: list[tuple[int, int]]) -> None:
    """Post one chain of device-readable buffers (iova, length), in one go."""
    q = r.tx
    ids = q._take(len(pieces))
    for k, (i, (addr, length)) in enumerate(zip(ids, pieces, strict=True)):
        last = k == len(pieces) - 1
        q.write_desc(i, addr, length, 0 if last else _N, 0 if last else ids[k + 1])
    q.publish(ids[0])


def _ichain(r: NetRig, pieces: list[tuple[int, int]], before: list[tuple[int, int]]) -> None:
    """Post one chain: direct descriptors ``before``, then an indirect table of ``pieces``."""
    mem = r.driver.mem
    table = mem.alloc(16 * len(pieces), align=16)
    for k, (addr, length) in enumerate(pieces):
        last = k == len(pieces) - 1
        mem.write(table + 16 * k, _DESC.pack(addr, length, 0 if last else _N, 0 if last else k + 1))
    q = r.tx
    ids = q._take(len(before) + 1)
    for k, (addr, length) in enumerate(before):
        q.write_desc(ids[k], addr, length, _N, ids[k + 1])
    q.write_desc(ids[-1], table, 16 * len(pieces), _I, 0)
    q.publish(ids[0])


def _run_both(post: Any, *, indirect: bool = False) -> tuple[list[dict[str, Any]], FastPath]:
    seen = []
    fast = None
    for on in (True, False):
        r = _rig(on, indirect=indirect)
        at = _data(r)
        post(r, at)
        r.tx.kick()
        r.device.process()
        seen.append(_observe(r))
        if on:
            fast = r.device.fastpath
    assert fast is not None
    return seen, fast


def test_valid_chains_are_taken_in_c_byte_exact() -> None:
    """Multi-buffer chains, one across a region edge, one split by max_mapping_size, one from
    read-only memory: all in C, the same frames, used ring and ledger counts."""

    def post(r: NetRig, at: int) -> None:
        _chain(r, [(at, 12), (at + 100, 60)])
        _chain(r, [(END - 40, 100)])  # 40 bytes from the main region, 60 from ADJ
        _chain(r, [(at, 3 * MAX_MAP + 5)])  # four pieces
        _chain(r, [(at + 7, 12), (RO, 64), (ADJ + 5, 1)])
        for k in range(8):
            _chain(r, [(at + 16 * k, 12 + k)])

    seen, fast = _run_both(post)
    assert seen[0] == seen[1]
    assert fast.tx_chains == 12
    frames = seen[0]["frames"]
    assert len(frames) == 12 and len(frames[1]) == 100 and len(frames[2]) == 3 * MAX_MAP + 5
    led = seen[0]["ledger"]
    assert led["maps"] - 6 == led["unmaps"] == 2 + 2 + 4 + 3 + 8  # 6: the rings, still mapped
    assert seen[0]["stats"]["chains"] == seen[0]["stats"]["packets"] == 12


def test_indirect_chains_are_taken_in_c_byte_exact() -> None:
    """Chains through indirect tables, as Linux posts a TSO frame's fragments: alone, after
    direct descriptors, with buffers split by max_mapping_size and across a region edge, and a
    table long enough to be mapped in two pieces. All in C, with the same frames, used ring and
    ledger counts (the table's own mapping and the peak included) as the Python path."""

    def post(r: NetRig, at: int) -> None:
        _ichain(r, [(at, 12), (at + 100, 60)], [])
        _ichain(r, [(at, 3 * MAX_MAP + 5), (END - 40, 100)], [])
        _ichain(r, [(at + 50, 20)], [(at, 12), (at + 300, 7)])
        _ichain(r, [(at, 12)] + [(at + 64 * k, 40 + k) for k in range(17)], [])
        _ichain(r, [(at + k, 1) for k in range(100)], [(at, 12)])  # 1600 bytes: two pieces

    seen, fast = _run_both(post, indirect=True)
    assert seen[0] == seen[1]
    assert fast.tx_chains == 5
    assert [len(f) for f in seen[0]["frames"]] == [
        72, 3 * MAX_MAP + 105, 39, 12 + sum(40 + k for k in range(17)), 112]


def test_an_indirect_tables_own_mapping_counts_in_the_peak() -> None:
    """A table mapped in two pieces whose descriptors map one buffer: the ledger's peak is the
    table's two pieces, as when the Python path maps the table, not the one buffer."""

    def post(r: NetRig, at: int) -> None:
        _ichain(r, [(at, 12)] + [(at, 0)] * 99, [])

    seen, fast = _run_both(post, indirect=True)
    assert seen[0] == seen[1]
    assert fast.tx_chains == 1
    assert seen[0]["ledger"]["peak_live"] == 6 + 2  # the rings, then the table's pieces


def _itable_post(case: str) -> Any:
    def post(r: NetRig, at: int) -> None:
        mem = r.driver.mem
        table = mem.alloc(64, align=16)
        descs = [(at, 12, _N, 1), (at + 40, 30, 0, 0)]
        if case == "nested":
            descs[1] = (table, 16, _I, 0)
        raw = b"".join(_DESC.pack(*d) for d in descs)
        if case == "across a region edge":
            # Two regions over one host buffer, so that a walk reading on past the first
            # region's end would find the table's second descriptor intact: only the bounds
            # check can tell the burst to leave it.
            host = bytearray(2 * P)
            host[P - 16 : P + 16] = raw
            mem.memory.add_region(SPLIT, memoryview(host)[:P], writable=True)
            mem.memory.add_region(SPLIT + P, memoryview(host)[P:], writable=True)
            table = SPLIT + P - 16
        else:
            mem.write(table, raw)
        q = r.tx
        ids = q._take(2)
        length = 24 if case == "length not a whole number of descriptors" else 32
        flags = _I | (_N if case == "NEXT on it" else 0)
        q.write_desc(ids[0], table, length, flags, ids[1])
        q.write_desc(ids[1], at, 20, 0, 0)
        q.publish(ids[0])

    return post


@pytest.mark.parametrize("case", ["not negotiated", "nested", "NEXT on it", "across a region edge",
                                  "length not a whole number of descriptors"])  # fmt: skip
def test_an_indirect_table_the_burst_will_not_take_is_the_python_paths(case: str) -> None:
    """Each is the Python path's to judge (a broken queue, or, across a region edge, a frame it
    sends): the same result, none of it from C."""
    seen, fast = _run_both(_itable_post(case), indirect=case != "not negotiated")
    assert seen[0] == seen[1]
    assert fast.tx_chains == 0
    sent = len(seen[0]["frames"])
    assert sent == (1 if case == "across a region edge" else 0)


def test_a_chain_the_burst_will_not_take_goes_to_the_python_path() -> None:
    """Valid, then a device-writable TX buffer (the queue breaks, in the Python path's words),
    then valid: the first in C, the rest as the Python path alone does it."""

    def post(r: NetRig, at: int) -> None:
        _chain(r, [(at, 40)])
        (i,) = r.tx._take(1)
        r.tx.write_desc(i, at, 40, _W, 0)
        r.tx.publish(i)
        _chain(r, [(at, 40)])

    seen, fast = _run_both(post)
    assert seen[0] == seen[1]
    assert fast.tx_chains == 1
    assert seen[0]["state"]["broken"] and seen[0]["status"] & C.STATUS_NEEDS_RESET


def test_a_removed_region_is_never_touched() -> None:
    """The region table is rebuilt when guest memory changes: a chain into a region removed
    after a burst is refused by the Python path (unmapped IOVA), not read through a stale host
    address."""
    r = _rig(True)
    at = _data(r)
    _chain(r, [(ADJ, 64)])
    r.tx.kick()
    r.device.process()
    fast = r.device.fastpath
    assert fast is not None and fast.tx_chains == 1
    assert r.ledger is not None
    r.driver.mem.memory.remove_range(ADJ, 2 * P)
    _chain(r, [(at, 12), (ADJ, 64)])
    r.tx.kick()
    r.device.process()
    assert fast.tx_chains == 1
    assert r.ledger.violations["unmapped_iova"] == 1
    assert r.device.queues[1].broken


def test_nothing_moves_with_bus_master_off() -> None:
    """With Bus Master Enable clear neither path touches the ring; set again, both send."""
    for on in (True, False):
        r = _rig(on)
        _chain(r, [(_data(r), 40)])
        r.bus_master[0] = False
        r.tx.kick()
        r.device.process()
        first = _observe(r)
        assert first["frames"] == [] and first["stats"]["chains"] == 0
        r.bus_master[0] = True
        r.tx.kick()
        r.device.process()
        assert len(_observe(r)["frames"]) == 1
        assert r.device.fastpath is None or r.device.fastpath.tx_chains == 1


@pytest.mark.parametrize("name", [FAST_TX_ENV, FAST_RX_ENV])
def test_the_switches_refuse_a_mistyped_value(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "of")
    with pytest.raises(ValueError, match=f"{name}='of': expected on or off"):
        net_rig(ledger=True, backend=FdBackend(), bursts=True)
    monkeypatch.setenv(name, "off")
    fp = net_rig(ledger=True, backend=FdBackend(), bursts=True).device.fastpath
    assert fp is not None and (fp.tx_on, fp.rx_on) == (name != FAST_TX_ENV, name != FAST_RX_ENV)

