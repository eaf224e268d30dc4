"""``python -m harness.bench.dmamap``: micro-benchmark of the server's DMA_MAP/UNMAP path.

Behind a vIOMMU every guest mapping is a vfio-user DMA_MAP (and later a DMA_UNMAP) during
which QEMU's vCPU waits for our reply, so what the server does per message is on the guest's
critical path. This times, in one process, the pieces of that path that are ours, each with the
old and the new way side by side (the switches ``harness bench net --ab`` flips in a VM run):

- ``region``: what the map + unmap callbacks do to guest memory (``add_region``, the ledger's
  ``check_region``, ``remove_range``, ``check_region``) with ``--regions`` 4 KiB regions live,
  for ``HARNESS_GUEST_INDEX=tree`` and ``sorted``;
- ``observer``: the guest-IOVA observer's ``mapped`` + ``unmapped`` (same callbacks);
- ``lookup``: ``GuestMemory.translate`` of a random live region (the data path under a vIOMMU);
- ``wire``: ``WireTaker.take`` (harness.vfu.wire) after a quiet ``vfu_run_ctx`` (at least two
  per message), for ``HARNESS_WIRE_TAKE=scan`` and ``fast``.

Figures are ns per operation (``perf_counter_ns`` around each), median and p99 over
``--ops`` operations; the garbage collector is frozen during the samples.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from harness import knobs
from harness.dma.ledger import DmaLedger
from harness.dma.mapops import DirectMapOps
from harness.dma.memory import GuestMemory
from harness.dma.observer import GuestIovaObserver

__all__ = ["main", "run"]

P = 4096


def _stats(samples: list[int]) -> dict[str, float]:
    samples.sort()
    n = len(samples)
    return {"p50_ns": float(samples[n // 2]), "p99_ns": float(samples[min(n - 1, n * 99 // 100)]),
            "mean_ns": sum(samples) / n}


def _timed(op: Callable[[int], None], ops: int) -> dict[str, float]:
    clock = time.perf_counter_ns
    out = []
    gc.collect()
    gc.freeze()
    try:
        for i in range(ops):
            t0 = clock()
            op(i)
            out.append(clock() - t0)
    finally:
        gc.unfreeze()
    return _stats(out)


def _iovas(n: int, rng: random.Random) -> list[int]:
    """n distinct page IOVAs scattered below 4 GiB, as a guest's allocator leaves them."""
    return [pfn * P for pfn in rng.sample(range(1, 1 << 20), n)]


def _memory(index: str, live: list[int]) -> tuple[GuestMemory, DmaLedger]:
    mem = GuestMemory(index=index)
    for iova in live:
        mem.add_region(iova, memoryview(bytearray(P)), writable=True)
    return mem, DmaLedger(DirectMapOps(mem), mem)


def bench_region(index: str, regions: int, ops: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    pages = _iovas(regions + ops, rng)
    mem, ledger = _memory(index, pages[:regions])
    fresh = pages[regions:]
    # One view per op: removing a region releases its view, as the real unmap does.
    backing = bytearray(P)
    views = [memoryview(backing) for _ in range(ops)]

    def op(i: int) -> None:
        iova = fresh[i]
        mem.add_region(iova, views[i], writable=True)
        ledger.check_region(iova, P, present=True)
        mem.remove_range(iova, P)
        ledger.check_region(iova, P, present=False)

    return _timed(op, ops)


def bench_lookup(index: str, regions: int, ops: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    live = _iovas(regions, rng)
    mem, _ledger = _memory(index, live)
    picks = [rng.choice(live) + 64 for _ in range(ops)]
    return _timed(lambda i: mem.translate(picks[i], 1500, write=True) and None, ops)


def bench_observer(regions: int, ops: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    pages = _iovas(regions + ops, rng)
    obs = GuestIovaObserver(dma_mask_bits=64)
    for iova in pages[:regions]:
        obs.mapped(iova, P)
    fresh = pages[regions:]

    def op(i: int) -> None:
        obs.mapped(fresh[i], P)
        obs.unmapped(fresh[i], P)

    return _timed(op, ops)


def bench_wire(mode: str, ops: int) -> dict[str, float]:
    # Imported here: the compiled libvfio-user module is only needed for this workload.
    from harness.vfu.context import VfuContext
    from harness.vfu.wire import WIRE_TAKE_ENV

    with knobs.environment({WIRE_TAKE_ENV: mode}), tempfile.TemporaryDirectory() as tmp:
        ctx = VfuContext(os.path.join(tmp, "sock"))
        try:
            return _timed(lambda _i: ctx._wire.take(), ops)
        finally:
            ctx.close()


def run(regions: int, ops: int, seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for index in ("tree", "sorted"):
        rows.append({"workload": "region", "variant": index,
                     **bench_region(index, regions, ops, seed)})
    for index in ("tree", "sorted"):
        rows.append({"workload": "lookup", "variant": index,
                     **bench_lookup(index, regions, ops, seed)})
    rows.append({"workload": "observer", "variant": "-", **bench_observer(regions, ops, seed)})
    for mode in ("scan", "fast"):
        rows.append({"workload": "wire", "variant": mode, **bench_wire(mode, ops)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.dmamap",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--regions", type=int, default=1000, help="live 4 KiB regions (1000)")
    ap.add_argument("--ops", type=int, default=20000, help="operations per workload (20000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args(argv)
    if args.regions < 0 or args.ops < 1 or args.regions + args.ops > (1 << 20) - 1:
        ap.error("--regions >= 0, --ops >= 1, and together below 2^20 pages")
    rows = run(args.regions, args.ops, args.seed)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'workload':<10}{'variant':<8}{'p50 ns':>10}{'p99 ns':>10}{'mean ns':>10}"
          f"   ({args.regions} live regions, {args.ops} ops)")
    for r in rows:
        print(f"{r['workload']:<10}{r['variant']:<8}{r['p50_ns']:>10.0f}{r['p99_ns']:>10.0f}"
              f"{r['mean_ns']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
