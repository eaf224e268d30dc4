"""Reference model of the descriptor walk: the split ring's original walk, per-piece mapping.

Issue 12's round 4 replaced, on the data path, the split ring's three-level walk
(``_walk_table`` -> ``_add_buffer`` -> ``_map_into``, one ``contiguous`` + ``map_page`` +
``mapping_error`` per piece) by one inlined walk with one batched ``map_sg`` per buffer
(harness.virtio.virtqueue), and the packed ring's per-piece map calls by the batched one. The
old code lives on here, unchanged in its checks, their order and words, as the oracle the
production walk is compared with (tests/unit/test_walk_fast.py, on hostile split and packed
rings) and the other side of ``python -m harness.bench.walk``. Nothing in the device uses it.

``ReferenceSplitVirtqueue`` / ``ReferencePackedVirtqueue`` are the production ring classes
with the reference walk and mapping swapped in; everything else (rings, indirect tables,
push/unpop/discard, errors) is the production code.
"""

from __future__ import annotations

import struct

from harness.dma import Direction, DmaHandle
from harness.virtio.chain import Chain, ChainError, Virtqueue
from harness.virtio.constants import DESC_F_INDIRECT, DESC_F_NEXT, DESC_SIZE
from harness.virtio.packed import PackedVirtqueue
from harness.virtio.virtqueue import SplitVirtqueue

__all__ = ["ReferencePackedVirtqueue", "ReferenceSplitVirtqueue"]

_DESC = struct.Struct("<QIHH")


class _PerPieceMapping(Virtqueue):
    """A buffer mapped one piece at a time through the MapOps protocol."""

    def _map_into(
        self, out: list[DmaHandle], addr: int, length: int, direction: Direction, i: int,
        flags: int, max_map: int, name: str = "",
    ) -> None:  # fmt: skip
        """Map one descriptor's buffer into ``out``, in pieces of at most ``max_map`` bytes
        (on failure the pieces already mapped are in ``out``, for the caller to unmap)."""
        ops = self._mapops
        ctx = (name or self.name, i, flags)
        while True:
            n = length if length <= max_map else max_map
            # Under a vIOMMU a buffer crossing a page boundary spans two DMA regions.
            c = ops.contiguous(addr, n)
            if c < n:
                n = c
            h = ops.map_page(addr, n, direction, 0, ctx)
            if ops.mapping_error(h):
                self._map_failed(h, i, count=not name)
            out.append(h)
            length -= n
            if not length:
                return
            addr += n


class ReferenceSplitVirtqueue(_PerPieceMapping, SplitVirtqueue):
    """The split ring with the original walk: one frame per descriptor for the buffer."""

    def _walk_table(
        self, table: memoryview, first: int, n: int, chain: Chain, *, top: bool
    ) -> None:
        """Follow NEXT links from ``first`` in a table of ``n`` descriptors, mapping buffers."""
        ops = self._mapops
        max_map = ops.max_mapping_size()
        i = first
        for _ in range(n):
            addr, length, flags, nxt = _DESC.unpack_from(table, i * DESC_SIZE)
            if flags & DESC_F_INDIRECT:
                self._indirect(i, addr, length, flags, chain, top=top)
            elif length:
                self._add_buffer(chain, i, addr, length, flags, max_map)
            if not flags & DESC_F_NEXT:
                return
            if nxt >= n:
                raise ChainError(f"next {nxt} out of range (table of {n})", i)
            i = nxt
        raise ChainError(f"descriptor loop or chain longer than {n}", first)


class ReferencePackedVirtqueue(_PerPieceMapping, PackedVirtqueue):
    """The packed ring with per-piece mapping (its walk is the production one)."""
