"""The production descriptor walk against the reference model: identical chains and refusals.

Two queues over two identical guest memories, one the production ring class (the ledger's
fused ``map_sg``, the split ring's inlined walk), one the reference model of
harness.testing.refwalk (per-piece ``contiguous`` + ``map_page`` + ``mapping_error``, the
split ring's original three-level walk; the "classic" side). Hypothesis writes the same random
descriptor table, indirect tables and avail ring into both, with addresses at region edges,
in read-only, unmappable and absent memory, lengths past max_mapping_size and past 2^32,
NEXT loops, nested and misplaced INDIRECT, and Bus Master Enable off. Every pop must give the
same chain (each piece's iova, size, direction and ledger context) or the same refusal
(reason, descriptor, IOVA, transient or not), and the ledgers the same counters.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.dma import (
    ATTR_COHERENT,
    Direction,
    DirectMapOps,
    DmaHandle,
    DmaLedger,
    GuestMemory,
    MapCtx,
    map_pieces,
)
from harness.testing.refwalk import ReferencePackedVirtqueue, ReferenceSplitVirtqueue
from harness.virtio import constants as C
from harness.virtio.chain import Chain, Virtqueue
from harness.virtio.packed import PackedVirtqueue
from harness.virtio.virtqueue import SplitVirtqueue

P = 0x1000
RW = 0x10000  # 8 pages, writable; the rings and tables live in its first pages
RW2 = RW + 8 * P  # adjacent writable region: a buffer crossing RW's end is split in two
RO = 0x30000  # one read-only page
NOVIEW = 0x40000  # a region the device cannot access (view None)
GAP = 0x50000  # nothing
DESC_AT = RW  # descriptor table / packed ring
AVAIL_AT = RW + P
USED_AT = RW + 2 * P
TABLE_AT = RW + 3 * P  # indirect tables: 2 of 16 descriptors each
QSIZE = 16
MAX_MAP = 0x600  # small, so long buffers are split by max_mapping_size too

_DESC = struct.Struct("<QIHH")


def _memory() -> GuestMemory:
    mem = GuestMemory()
    mem.add_region(RW, memoryview(bytearray(8 * P)), writable=True)
    mem.add_region(RW2, memoryview(bytearray(2 * P)), writable=True)
    mem.add_region(RO, memoryview(bytearray(P)), writable=False)
    mem.add_region(NOVIEW, None, writable=True, size=P)
    return mem


@dataclass
class Side:
    """One queue with its memory and ledger, and what it reported."""

    queue: Virtqueue
    mem: GuestMemory
    ledger: DmaLedger
    bme: list[bool]
    errors: list[str] = field(default_factory=list)

    def write(self, iova: int, data: bytes) -> None:
        view = self.mem.view(iova, len(data), write=True)
        view[:] = data


def _side(walk: str, packed: bool, indirect: bool) -> Side:
    mem = _memory()
    bme = [True]
    ledger = DmaLedger(DirectMapOps(mem, max_mapping_size=MAX_MAP), mem,
                       bus_master=lambda: bme[0])  # fmt: skip
    errors: list[str] = []
    cls: type[Virtqueue]
    if walk == "fast":
        cls = PackedVirtqueue if packed else SplitVirtqueue
    else:
        cls = ReferencePackedVirtqueue if packed else ReferenceSplitVirtqueue
    q = cls(0, QSIZE, ledger, name="q", on_error=lambda _q, why: errors.append(why))
    q.size = QSIZE
    q.desc_addr, q.avail_addr, q.used_addr = DESC_AT, AVAIL_AT, USED_AT
    assert q.enable(event_idx=False, indirect=indirect)
    return Side(q, mem, ledger, bme, errors)


def _chain(c: Chain) -> tuple[Any, ...]:
    def pieces(hs: list[DmaHandle]) -> list[tuple[Any, ...]]:
        return [(h.iova, h.size, h.direction, h.ctx, h.attrs, bytes(h.view)) for h in hs]

    return (c.head, pieces(c.readable), pieces(c.writable), c.read_len, c.write_len,
            c.ndescs, c.pos)  # fmt: skip


def _ledger_counts(led: DmaLedger) -> dict[str, Any]:
    s = led.stats()
    keep = ("maps", "unmaps", "coherent_maps", "map_bytes", "failed_maps", "live", "peak_live",
            "violations")
    return {k: s[k] for k in keep}


def _run(side: Side, pops: int) -> list[Any]:
    """Pop up to ``pops`` chains, completing each; what happened, step by step."""
    q = side.queue
    trace: list[Any] = []
    for _ in range(pops):
        c = q.pop()
        trace.append(None if c is None else _chain(c))
        trace.append((q.broken, q.stats.errors, q.stats.map_errors, list(side.errors)))
        if c is None:
            break
        q.push(c, 0)
    trace.append(_ledger_counts(side.ledger))
    return trace


# Addresses a hostile driver might supply: inside, at and across region edges, elsewhere.
_ADDRS = st.one_of(
    st.sampled_from([RW + 4 * P, RW + 8 * P - 8, RW2 - 1, RW2 + 2 * P - 4, RO, RO + P - 2,
                     NOVIEW, GAP, 0, TABLE_AT, (1 << 64) - 8]),
    st.integers(RW + 4 * P, RW2 + 2 * P),
    st.integers(0, (1 << 64) - 1),
)
_LENS = st.one_of(st.integers(0, 3 * MAX_MAP), st.sampled_from([16, 32, 0x10000,
                                                                 0xFFFFFFFF, 0x80000000]))
_FLAGS = st.sets(st.sampled_from([C.DESC_F_NEXT, C.DESC_F_WRITE, C.DESC_F_INDIRECT]))


@st.composite
def _table(draw: st.DrawFn, n: int, packed: bool) -> bytes:
    out = bytearray()
    for k in range(n):
        if draw(st.booleans()):
            # A plausible descriptor: a small buffer in writable memory, WRITE or not, NEXT
            # to the following one or not. Runs of these make chains of several mapped
            # buffers, where the order rules (readable after writable) and the 32-bit total
            # bite; fully random tables almost never get that far.
            flags = draw(st.sampled_from([0, C.DESC_F_WRITE]))
            flags |= draw(st.sampled_from([0, C.DESC_F_NEXT, C.DESC_F_NEXT]))
            addr = draw(st.integers(RW + 4 * P, RW + 6 * P))
            length = draw(st.integers(1, 0x200))
            nxt = (k + 1) % 32
        else:
            flags = sum(draw(_FLAGS))
            addr = draw(_ADDRS)
            length = draw(_LENS)
            nxt = draw(st.integers(0, 20))
        if flags & C.DESC_F_INDIRECT and draw(st.booleans()):
            addr, length = TABLE_AT + draw(st.sampled_from([0, 16 * 16])), 16 * draw(
                st.integers(1, 16))
        if packed:
            # Mostly available in the first lap (AVAIL = wrap 1, USED clear); ids anything.
            if draw(st.integers(0, 9)):
                flags |= C.DESC_F_AVAIL
            out += _DESC.pack(addr, length, nxt, flags)
        else:
            out += _DESC.pack(addr, length, flags, nxt)
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    packed=st.booleans(),
    indirect=st.booleans(),
    bme=st.booleans(),
    heads=st.lists(st.integers(0, 20), min_size=QSIZE, max_size=QSIZE),
    avail=st.integers(0, QSIZE + 2),
)
def test_fast_and_classic_walks_agree_on_hostile_rings(
    data: st.DataObject, packed: bool, indirect: bool, bme: bool, heads: list[int], avail: int,
) -> None:
    ring = data.draw(_table(QSIZE, packed))
    tables = data.draw(_table(32, packed))
    sides = [_side(walk, packed, indirect) for walk in ("fast", "classic")]
    traces = []
    for s in sides:
        s.write(DESC_AT, ring)
        s.write(TABLE_AT, tables)
        if not packed:
            s.write(AVAIL_AT, struct.pack(f"<HH{QSIZE}H", 0, avail, *heads))
        s.bme[0] = bme
        traces.append(_run(s, QSIZE + 2))
    assert traces[0] == traces[1]


_B = RW + 4 * P  # plausible buffers
_W, _N, _I = C.DESC_F_WRITE, C.DESC_F_NEXT, C.DESC_F_INDIRECT
# Hand-made split rings (descriptor table, indirect table) for the rules a random table rarely
# reaches: each must give the same chain or refusal on both sides, whatever hypothesis drew.
_KNOWN: dict[str, tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]] = {
    "readable after writable": ([(_B, 16, _W | _N, 1), (_B + 64, 16, 0, 0)], []),
    "writable then writable": ([(_B, 16, _W | _N, 1), (_B + 64, 16, _W, 0)], []),
    "readable after writable, indirect": ([(TABLE_AT, 32, _I, 0)],
                                          [(_B, 16, _W | _N, 1), (_B + 64, 16, 0, 0)]),
    "past 2^32": ([(_B, 16, _N, 1), (_B, 0xFFFFFFF8, 0, 0)], []),
    "next out of range": ([(_B, 16, _N, QSIZE)], []),
    "loop": ([(_B, 16, _N, 1), (_B + 64, 16, _N, 0)], []),
    "nested indirect": ([(TABLE_AT, 16, _I, 0)], [(TABLE_AT, 16, _I, 0)]),
    "indirect with next": ([(TABLE_AT, 16, _I | _N, 1), (_B, 16, 0, 0)], [(_B, 16, 0, 0)]),
    "split at max_mapping_size": ([(_B, 3 * MAX_MAP + 5, _W, 0)], []),
}


@pytest.mark.parametrize("case", sorted(_KNOWN))
def test_fast_and_classic_walks_agree_on_known_chains(case: str) -> None:
    ring, table = _KNOWN[case]
    traces = []
    for walk in ("fast", "classic"):
        s = _side(walk, False, True)
        s.write(DESC_AT, b"".join(_DESC.pack(*d) for d in ring))
        s.write(TABLE_AT, b"".join(_DESC.pack(*d) for d in table))
        s.write(AVAIL_AT, struct.pack("<HHH", 0, 1, 0))
        traces.append(_run(s, 2))
    assert traces[0] == traces[1]


# ---- the map layer alone: the ledger's fused map_sg against map_pieces over map_page ------


@settings(max_examples=400, deadline=None)
@given(
    iova=_ADDRS,
    length=st.integers(1, 4 * P),
    direction=st.sampled_from(list(Direction)),
    flags=st.sampled_from([-1, 0, C.DESC_F_WRITE, C.DESC_F_WRITE | C.DESC_F_NEXT]),
    attrs=st.sampled_from([0, ATTR_COHERENT]),
    max_map=st.sampled_from([1, 0x100, MAX_MAP, 1 << 32]),
    bme=st.booleans(),
)
def test_map_sg_is_map_pieces(
    iova: int, length: int, direction: Direction, flags: int, attrs: int, max_map: int,
    bme: bool,
) -> None:  # fmt: skip
    results = []
    for fused in (True, False):
        mem = _memory()
        led = DmaLedger(DirectMapOps(mem, max_mapping_size=MAX_MAP), mem,
                        bus_master=lambda: bme)  # fmt: skip
        ctx: MapCtx = ("q", 3, flags)
        out: list[DmaHandle] = []
        if fused:
            bad = led.map_sg(out, iova, length, direction, attrs, ctx, max_map)
        else:
            bad = map_pieces(led, out, iova, length, direction, attrs, ctx, max_map)
        got = [(h.iova, h.size, h.direction, h.ctx, h.attrs, h.view.readonly,
                h.region is not None) for h in out]  # fmt: skip
        err = None if bad is None else (bad.iova, bad.size, bad.direction, str(bad.error),
                                        bad.error.transient if bad.error else None)  # fmt: skip
        results.append((got, err, _ledger_counts(led)))
        for h in out:
            led.unmap_page(h, direction)
        assert led.live == 0
    assert results[0] == results[1]


def test_ledger_off_map_sg_is_the_layer_below() -> None:
    mem = _memory()
    led = DmaLedger(DirectMapOps(mem), mem, checks=False)
    out: list[DmaHandle] = []
    assert led.map_sg(out, RW2 - 8, 16, Direction.TO_DEVICE, 0, ("q", 0, 0), 1 << 32) is None
    assert [(h.iova, h.size) for h in out] == [(RW2 - 8, 8), (RW2, 8)]
    assert led.maps == 0  # a pass-through counts nothing


def test_walk_benchmark_runs_both_sides() -> None:
    from harness.bench import walk

    res = walk.run(rounds=1)
    assert set(res) == set(walk.SHAPES)
    assert all(r["fast_ns"] > 0 and r["classic_ns"] > 0 for r in res.values())
