"""The ledger's fused ``unmap_sg`` against ``unmap_pieces``: the same effects, handle by handle.

Two identical worlds (guest memory, DirectMapOps, DmaLedger) make the same handles; hypothesis
then unmaps the same lists of them in both, one world through ``ledger.unmap_sg`` (the fused
loop the virtqueue calls once per chain side), the other through ``unmap_pieces`` (the
ledger's ``unmap_page`` per handle). The lists hold what a buggy or attacked device might hand
over: handles mapped in the other direction, already unmapped ones, the same handle twice,
failed maps, handles of another ledger, handles whose region the guest removed (revoked), and
views with a live buffer export (release impossible). Every handle's state, the counters and
the violations by kind must be the same.
"""

from __future__ import annotations

import ctypes
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.dma import (
    Direction,
    DirectMapOps,
    DmaHandle,
    DmaLedger,
    FaultInjectingMapOps,
    FaultSpec,
    GuestMemory,
    sg_unmapper,
    unmap_pieces,
)

P = 0x1000
RW = 0x10000
DOOMED = 0x20000  # a region the guest removes (revoking the mappings into it)
RO = 0x30000

# (iova, size, direction) of the handles each world maps; the last one fails (read-only).
MAPS = [
    (RW, 0x100, Direction.TO_DEVICE),
    (RW + 0x200, 0x300, Direction.FROM_DEVICE),
    (RW + P, 0x80, Direction.FROM_DEVICE),
    (RW + 2 * P, P, Direction.TO_DEVICE),
    (DOOMED, 0x40, Direction.FROM_DEVICE),
    (DOOMED + 0x100, 0x40, Direction.TO_DEVICE),
    (RO, 0x10, Direction.FROM_DEVICE),
]
EXPORTED = 3  # handle index whose view has a live buffer export
FOREIGN = len(MAPS)  # index of a handle of another ledger
N = len(MAPS) + 1


class World:
    """One memory, direct map ops, ledger and the handles ``MAPS`` made in it."""

    def __init__(self) -> None:
        mem = GuestMemory()
        mem.add_region(RW, memoryview(bytearray(4 * P)), writable=True)
        mem.add_region(DOOMED, memoryview(bytearray(P)), writable=True)
        mem.add_region(RO, memoryview(bytearray(P)), writable=False)
        self.ledger = DmaLedger(DirectMapOps(mem), mem)
        self.handles = [self.ledger.map_page(i, n, d) for i, n, d in MAPS]
        assert self.handles[-1].error is not None
        other_mem = GuestMemory()
        other_mem.add_region(RW, memoryview(bytearray(P)), writable=True)
        other = DmaLedger(DirectMapOps(other_mem), other_mem)
        self.handles.append(other.map_page(RW, 0x10, Direction.TO_DEVICE))
        # A live export of one view: releasing it raises BufferError (swallowed by release).
        self.export = ctypes.c_char.from_buffer(self.handles[EXPORTED].guest)  # type: ignore[arg-type]
        mem.remove_range(DOOMED, P)

    def state(self) -> list[Any]:
        led = self.ledger
        out: list[Any] = [led.unmaps, led.live, dict(led.violations)]
        for h in self.handles:
            out.append((h.unmapped, h.revoked, h.region is None, _released(h.view),
                        h.guest is None or _released(h.guest)))  # fmt: skip
        return out


def _released(view: memoryview) -> bool:
    try:
        len(view)
    except ValueError:
        return True
    return False


_directions = st.sampled_from([Direction.TO_DEVICE, Direction.FROM_DEVICE])
calls = st.lists(
    st.tuples(st.lists(st.integers(0, N - 1), max_size=6), _directions), min_size=1, max_size=5
)


@settings(max_examples=300, deadline=None)
@given(calls)
def test_unmap_sg_is_unmap_pieces(script: list[tuple[list[int], Direction]]) -> None:
    fused, pieces = World(), World()
    assert fused.ledger.unmap_sg == fused.ledger._unmap_sg_direct  # the fused path is tested
    for idx, direction in script:
        fused.ledger.unmap_sg([fused.handles[i] for i in idx], direction)
        unmap_pieces(pieces.ledger, [pieces.handles[i] for i in idx], direction)
        assert fused.state() == pieces.state()


def test_unmap_sg_unmaps_a_chain_side() -> None:
    """The plain case: every handle of a list unmapped, counted once, nothing reported."""
    w = World()
    side = [w.handles[1], w.handles[2]]
    before = dict(w.ledger.violations)  # the read-only map of MAPS
    w.ledger.unmap_sg(side, Direction.FROM_DEVICE)
    assert all(h.unmapped and h.region is None and _released(h.view) for h in side)
    assert w.ledger.unmaps == 2 and w.ledger.violations == before


def test_sg_unmapper_picks_the_layer() -> None:
    """The ledger's own unmap_sg; over fault injection its per-handle reference; with the
    ledger off, the layer below's unmap_page per handle (nothing counted)."""
    mem = GuestMemory()
    mem.add_region(RW, memoryview(bytearray(P)), writable=True)
    direct = DirectMapOps(mem)
    led = DmaLedger(direct, mem)
    assert sg_unmapper(led) == led._unmap_sg_direct
    faulty = DmaLedger(FaultInjectingMapOps(direct, FaultSpec()), mem)
    assert sg_unmapper(faulty) == faulty._unmap_sg_pieces
    off = DmaLedger(direct, mem, checks=False)
    h = off.map_page(RW, 0x10, Direction.TO_DEVICE)
    off.unmap_sg([h], Direction.TO_DEVICE)
    assert h.unmapped and off.unmaps == 0
    raw = sg_unmapper(direct)
    h2 = direct.map_page(RW, 0x10, Direction.FROM_DEVICE)
    raw([h2], Direction.FROM_DEVICE)
    assert h2.unmapped and _released(h2.view)


def test_dmahandle_fields_and_defaults() -> None:
    """The handle keeps its fields, defaults and identity semantics (hashable by identity:
    the ledger's live set and the regions' live sets hold handles)."""
    v = memoryview(b"x")
    h = DmaHandle(1, 2, Direction.TO_DEVICE, v, 3)
    assert (h.iova, h.size, h.direction, h.view, h.addr) == (1, 2, Direction.TO_DEVICE, v, 3)
    assert (h.error, h.cookie, h.attrs, h.ctx) == (None, None, 0, None)
    assert h.guest is None and h.region is None
    assert not (h.bounced or h.revoked or h.unmapped)
    same = DmaHandle(1, 2, Direction.TO_DEVICE, v, 3)
    assert h != same and len({h, same}) == 2
    assert "iova=1" in repr(h)
