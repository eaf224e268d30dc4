"""``python -m harness.bench.walk``: micro-benchmark of popping and completing chains.

Times, in one process, what the device does per chain on the plain (no vIOMMU) data path:
``pop`` (read the avail ring, walk the descriptors, map every buffer through the DMA ledger
over direct mapping) and ``push`` (unmap, write the used entry), with one ``flush`` per ring's
worth. Two sides, alternating round by round: ``fast``, the device's ring classes, and
``classic``, the reference model of the walk before issue 12's round 4
(harness.testing.refwalk: the split ring's three-level walk, per-piece map calls; it shares
everything else, unmapping included, with the device's), on the same chain shapes:

- ``tx2``: header + data, two device-readable descriptors (a TX frame without offloads);
- ``rx1``: one device-writable 1526-byte buffer (mergeable RX);
- ``ind3``: an indirect table of three readable descriptors (TX with VIRTIO_F_INDIRECT_DESC);
- ``packed-tx2``: ``tx2`` on a packed ring.

Figures are ns per chain (pop + push, flush shared), median over ``--rounds`` rounds of a
full ring each; the garbage collector is frozen while timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import sys
import time

from harness.dma.ledger import DmaLedger
from harness.dma.mapops import DirectMapOps
from harness.dma.memory import GuestMemory
from harness.testing.refwalk import ReferencePackedVirtqueue, ReferenceSplitVirtqueue
from harness.virtio import constants as C
from harness.virtio.chain import Virtqueue
from harness.virtio.packed import PackedVirtqueue
from harness.virtio.virtqueue import SplitVirtqueue

__all__ = ["main", "run"]

QSIZE = 256
BASE = 0x100000
DESC_AT, AVAIL_AT, USED_AT, TABLES_AT, DATA_AT = (BASE + k * 0x10000 for k in range(5))
_DESC = struct.Struct("<QIHH")
SHAPES = ("tx2", "rx1", "ind3", "packed-tx2")


class _Ring:
    """One queue over 1 MiB of guest memory, filled with ``shape`` chains."""

    def __init__(self, shape: str, walk: str) -> None:
        mem = GuestMemory()
        self.view = memoryview(bytearray(1 << 20))
        mem.add_region(BASE, self.view, writable=True)
        ledger = DmaLedger(DirectMapOps(mem), mem)
        self.packed = shape.startswith("packed")
        cls: type[Virtqueue]
        if walk == "fast":
            cls = PackedVirtqueue if self.packed else SplitVirtqueue
        else:
            cls = ReferencePackedVirtqueue if self.packed else ReferenceSplitVirtqueue
        q: Virtqueue = cls(0, QSIZE, ledger, name="tx0", on_error=_unexpected)
        q.size = QSIZE
        q.desc_addr, q.avail_addr, q.used_addr = DESC_AT, AVAIL_AT, USED_AT
        self.queue = q
        self.shape = shape
        self.wrap = 1
        self.idx = 0
        per = {"tx2": 2, "rx1": 1, "ind3": 1, "packed-tx2": 2}[shape]
        self.chains = QSIZE // per
        if not self.packed:
            for k in range(self.chains):
                self._split_chain(k, per)
        if not q.enable(event_idx=False, indirect=True):
            raise RuntimeError("queue refused")

    def _w(self, iova: int, data: bytes) -> None:
        self.view[iova - BASE : iova - BASE + len(data)] = data

    def _split_chain(self, k: int, per: int) -> None:
        head = k * per
        data = DATA_AT + 2048 * k
        if self.shape == "tx2":
            self._w(DESC_AT + 16 * head, _DESC.pack(data, 12, C.DESC_F_NEXT, head + 1))
            self._w(DESC_AT + 16 * (head + 1), _DESC.pack(data + 12, 1502, 0, 0))
        elif self.shape == "rx1":
            self._w(DESC_AT + 16 * head, _DESC.pack(data, 1526, C.DESC_F_WRITE, 0))
        else:  # ind3
            table = TABLES_AT + 48 * k
            for j, (off, n) in enumerate(((0, 12), (12, 700), (712, 802))):
                nxt = C.DESC_F_NEXT if j < 2 else 0
                self._w(table + 16 * j, _DESC.pack(data + off, n, nxt, j + 1))
            self._w(DESC_AT + 16 * head, _DESC.pack(table, 48, C.DESC_F_INDIRECT, 0))
        self._w(AVAIL_AT + 4 + 2 * k, struct.pack("<H", head))

    def offer(self) -> None:
        """Make a ring's worth of chains available again."""
        if self.packed:
            avail = C.DESC_F_AVAIL if self.wrap else C.DESC_F_USED
            for k in range(self.chains):
                data = DATA_AT + 2048 * k
                self._w(DESC_AT + 32 * k, _DESC.pack(data, 12, k, avail | C.DESC_F_NEXT))
                self._w(DESC_AT + 32 * k + 16, _DESC.pack(data + 12, 1502, k, avail))
            self.wrap ^= 1
        else:
            self.idx = (self.idx + self.chains) & 0xFFFF
            self._w(AVAIL_AT + 2, struct.pack("<H", self.idx))

    def drain(self) -> int:
        q = self.queue
        n = 0
        while (c := q.pop()) is not None:
            q.push(c, 0)
            n += 1
        q.flush()
        return n


def _unexpected(_q: Virtqueue, why: str) -> None:
    raise RuntimeError(f"benchmark ring refused: {why}")


def run(rounds: int = 200) -> dict[str, dict[str, float]]:
    """ns per chain (pop + push) per shape and side: {shape: {fast, classic, ratio}}."""
    out: dict[str, dict[str, float]] = {}
    for shape in SHAPES:
        rings = {w: _Ring(shape, w) for w in ("fast", "classic")}
        samples: dict[str, list[float]] = {w: [] for w in rings}
        gc.collect()
        gc.freeze()
        try:
            for _ in range(rounds):
                for w, ring in rings.items():
                    ring.offer()
                    t0 = time.perf_counter_ns()
                    n = ring.drain()
                    dt = time.perf_counter_ns() - t0
                    if n != ring.chains:
                        raise RuntimeError(f"{shape} {w}: popped {n} of {ring.chains}")
                    samples[w].append(dt / n)
        finally:
            gc.unfreeze()
        med = {w: sorted(s)[len(s) // 2] for w, s in samples.items()}
        out[shape] = {"fast_ns": round(med["fast"]), "classic_ns": round(med["classic"]),
                      "fast/classic": round(med["fast"] / med["classic"], 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.walk", description=__doc__)
    ap.add_argument("--rounds", type=int, default=200, help="full rings per side (200)")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    res = run(args.rounds)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{'shape':<12}{'fast ns':>10}{'classic ns':>12}{'fast/classic':>14}")
    for shape, r in res.items():
        print(f"{shape:<12}{r['fast_ns']:>10.0f}{r['classic_ns']:>12.0f}{r['fast/classic']:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
