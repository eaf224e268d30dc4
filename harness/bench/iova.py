"""``harness bench iova``: the IOVA domain against the pre-2026 allocator, side by side.

Four workloads from issue 3, each run on :class:`~harness.dma.iova.IovaDomain` and on
:class:`~harness.dma.iova_baseline.BaselineIovaDomain` in the same process:

1. ``steady``: 300,000 size-1 allocations, then 1,000 rounds of a random free plus an allocation;
2. ``fragmented``: 25,000 one-page holes below 4 GiB, then size-2 allocations under the 32-bit
   limit (each round first frees and re-allocates the top page, which moves the old allocator's
   cached node above the holes, as any free above it does);
3. ``limit32``: 32-bit-limited allocations on a domain dominated by 64-bit allocations;
4. ``cached``: the ``alloc_iova_fast``/``free_iova_fast`` path with warm range caches.

Latencies are per operation (``perf_counter_ns`` around each call); ``p50_ns``/``p99_ns`` are
allocations, ``free_*`` frees. The baseline is slow on purpose where the workload hurts it, so it
is given fewer operations there (``baseline_ops``); the table says so. ``bytes_per_entry`` is
``tracemalloc``'s growth while building the workload's domain divided by its entries. The garbage
collector is frozen after each setup so its full collections do not land in the samples.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Protocol

from harness.dma.iova import IovaDomain
from harness.dma.iova_baseline import BaselineIovaDomain
from harness.dma.rangetree import Iova

__all__ = ["Result", "main", "run"]

GRANULE = 4096
LIMIT32 = (1 << 20) - 1  # last pfn below 4 GiB with 4 KiB pages
LIMIT64 = (1 << 36) - 1  # a 48-bit DMA mask


class _Domain(Protocol):
    def alloc_iova(self, size: int, limit_pfn: int, size_aligned: bool = False) -> Iova | None: ...
    def free_iova(self, pfn: int) -> None: ...
    def alloc_iova_fast(
        self, size: int, limit_pfn: int, flush_rcache: bool = True, cpu: int = 0
    ) -> int | None: ...
    def free_iova_fast(self, pfn: int, size: int, cpu: int = 0) -> None: ...
    def __len__(self) -> int: ...


@dataclass
class Result:
    """One workload's numbers (the ``--json`` object)."""

    workload: str
    description: str
    ops: int
    p50_ns: int
    p99_ns: int
    free_p50_ns: int | None
    free_p99_ns: int | None
    baseline_ops: int
    baseline_p50_ns: int
    baseline_p99_ns: int
    speedup: float
    bytes_per_entry: float
    live_entries: int
    targets: dict[str, bool] = field(default_factory=dict)


def _pct(samples: Sequence[int], q: float) -> int:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))] if s else 0


def _timed(fn: Callable[[], object], out: list[int]) -> object:
    t0 = time.perf_counter_ns()
    r = fn()
    out.append(time.perf_counter_ns() - t0)
    return r


def _build(
    factory: Callable[[], _Domain], setup: Callable[[_Domain], object], measure_memory: bool
) -> tuple[_Domain, object, float]:
    """Build a domain and run the workload setup, with tracemalloc around it if asked."""
    gc.collect()
    if measure_memory:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    dom = factory()
    state = setup(dom)
    per_entry = 0.0
    if measure_memory:
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        # The setup's own bookkeeping (lists of live pfns) is not the domain's: subtract it.
        grown -= _sizeof_state(state)
        per_entry = grown / max(1, len(dom))
    gc.collect()
    gc.freeze()
    return dom, state, per_entry


def _sizeof_state(state: object) -> int:
    if isinstance(state, list):
        return sys.getsizeof(state)
    return 0


def _release() -> None:
    gc.unfreeze()
    gc.collect()


# ---------------------------------------------------------------------- workloads


def _steady(dom: _Domain, live: list[int], rounds: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    allocs: list[int] = []
    frees: list[int] = []
    for _ in range(rounds):
        i = rng.randrange(len(live))
        pfn = live[i]
        _timed(partial(dom.free_iova, pfn), frees)
        iova = _timed(lambda: dom.alloc_iova(1, LIMIT64), allocs)
        assert isinstance(iova, Iova)
        live[i] = iova.pfn_lo
    return allocs, frees


def _fill(dom: _Domain, n: int, size: int, limit: int) -> list[int]:
    out = []
    for _ in range(n):
        iova = dom.alloc_iova(size, limit)
        assert iova is not None
        out.append(iova.pfn_lo)
    return out


def _fragment(dom: _Domain, holes: int) -> list[int]:
    live = _fill(dom, 2 * holes + 1, 1, LIMIT32)
    for pfn in live[1::2]:
        dom.free_iova(pfn)
    return live[0::2]


def _fragmented_rounds(dom: _Domain, live: list[int], rounds: int) -> list[int]:
    allocs: list[int] = []
    top = live[0]
    for _ in range(rounds):
        dom.free_iova(top)
        again = dom.alloc_iova(1, LIMIT32)
        assert again is not None and again.pfn_lo == top
        iova = _timed(lambda: dom.alloc_iova(2, LIMIT32, True), allocs)
        assert isinstance(iova, Iova)
    return allocs


def _dominated(dom: _Domain, n64: int, n32: int) -> list[int]:
    _fill(dom, n64, 1, LIMIT64)
    return _fill(dom, n32, 1, LIMIT32)


def _limit32_rounds(
    dom: _Domain, live32: list[int], rounds: int, seed: int
) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    allocs: list[int] = []
    frees: list[int] = []
    for _ in range(rounds):
        iova = _timed(lambda: dom.alloc_iova(1, LIMIT32), allocs)
        assert isinstance(iova, Iova)
        live32.append(iova.pfn_lo)
        pfn = live32.pop(rng.randrange(len(live32)))
        _timed(partial(dom.free_iova, pfn), frees)
    return allocs, frees


def _cached(dom: _Domain, warm: int, rounds: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    sizes = [1 << rng.randrange(6) for _ in range(warm)]
    pfns = [dom.alloc_iova_fast(s, LIMIT64) for s in sizes]
    for pfn, s in zip(pfns, sizes, strict=True):
        assert pfn is not None
        dom.free_iova_fast(pfn, s)
    allocs: list[int] = []
    frees: list[int] = []
    for k in range(rounds):
        s = sizes[k % warm]
        got = _timed(partial(dom.alloc_iova_fast, s, LIMIT64), allocs)
        assert isinstance(got, int)
        _timed(partial(dom.free_iova_fast, got, s), frees)
    return allocs, frees


# ---------------------------------------------------------------------- driver


def _ours() -> _Domain:
    return IovaDomain(GRANULE, 1)


def _base() -> _Domain:
    return BaselineIovaDomain(GRANULE, 1)


def run(
    quick: bool = False, seed: int = 1, log: Callable[[str], None] | None = None
) -> list[Result]:
    """Run the four workloads; ``quick`` shrinks them to a smoke test."""
    say = log or (lambda s: None)
    n1, r1, rb1 = (3_000, 200, 200) if quick else (300_000, 1_000, 1_000)
    h2, r2, rb2 = (500, 100, 20) if quick else (25_000, 2_000, 100)
    n3, m3, r3, rb3 = (2_000, 100, 200, 200) if quick else (200_000, 1_000, 2_000, 2_000)
    w4, r4 = (200, 2_000) if quick else (1_000, 20_000)
    results: list[Result] = []

    def record(
        name: str,
        desc: str,
        ours: tuple[list[int], list[int] | None],
        base: list[int],
        per_entry: float,
        live: int,
    ) -> Result:
        allocs, frees = ours
        p50 = _pct(allocs, 0.5)
        bp50 = _pct(base, 0.5)
        res = Result(
            workload=name,
            description=desc,
            ops=len(allocs),
            p50_ns=p50,
            p99_ns=_pct(allocs, 0.99),
            free_p50_ns=_pct(frees, 0.5) if frees else None,
            free_p99_ns=_pct(frees, 0.99) if frees else None,
            baseline_ops=len(base),
            baseline_p50_ns=bp50,
            baseline_p99_ns=_pct(base, 0.99),
            speedup=round(bp50 / p50, 2) if p50 else 0.0,
            bytes_per_entry=round(per_entry, 1),
            live_entries=live,
        )
        results.append(res)
        return res

    # 1. steady state with 300,000 live entries
    say("steady: building")
    dom, live1, mem = _build(_ours, lambda d: _fill(d, n1, 1, LIMIT64), True)
    a, f = _steady(dom, live1, r1, seed)  # type: ignore[arg-type]
    live = len(dom)
    _release()
    say("steady: baseline")
    bdom, blive1, _ = _build(_base, lambda d: _fill(d, n1, 1, LIMIT64), False)
    ba, _ = _steady(bdom, blive1, rb1, seed)  # type: ignore[arg-type]
    _release()
    res = record(
        "steady", f"{n1} size-1 allocs, then {r1} x (random free + alloc)", (a, f), ba, mem, live
    )
    res.targets = {
        "alloc_p50<=5us": res.p50_ns <= 5_000,
        "alloc_p99<=25us": res.p99_ns <= 25_000,
        "free_p50<=5us": (res.free_p50_ns or 0) <= 5_000,
        "free_p99<=25us": (res.free_p99_ns or 0) <= 25_000,
        "bytes_per_entry<=200": res.bytes_per_entry <= 200,
    }

    # 2. fragmented
    say("fragmented")
    dom, live2, mem = _build(_ours, lambda d: _fragment(d, h2), True)
    a = _fragmented_rounds(dom, live2, r2)  # type: ignore[arg-type]
    live = len(dom)
    _release()
    bdom, blive2, _ = _build(_base, lambda d: _fragment(d, h2), False)
    ba = _fragmented_rounds(bdom, blive2, rb2)  # type: ignore[arg-type]
    _release()
    res = record(
        "fragmented",
        f"{h2} one-page holes, size-2 allocs under the 32-bit limit",
        (a, None),
        ba,
        mem,
        live,
    )
    res.targets = {"speedup>=100": res.speedup >= 100}

    # 3. 32-bit limit on a 64-bit dominated domain
    say("limit32")
    dom, live3, mem = _build(_ours, lambda d: _dominated(d, n3, m3), True)
    a, f = _limit32_rounds(dom, live3, r3, seed)  # type: ignore[arg-type]
    live = len(dom)
    _release()
    bdom, blive3, _ = _build(_base, lambda d: _dominated(d, n3, m3), False)
    ba, _ = _limit32_rounds(bdom, blive3, rb3, seed)  # type: ignore[arg-type]
    _release()
    res = record(
        "limit32", f"32-bit allocs + frees beside {n3} 64-bit entries", (a, f), ba, mem, live
    )
    res.targets = {"alloc_p50<=5us": res.p50_ns <= 5_000, "alloc_p99<=25us": res.p99_ns <= 25_000}

    # 4. cached fast path
    say("cached")
    dom, _, mem = _build(_ours, lambda d: None, False)
    a, f = _cached(dom, w4, r4, seed)
    live = len(dom)
    _release()
    bdom, _, _ = _build(_base, lambda d: None, False)
    ba, _ = _cached(bdom, w4, r4, seed)
    _release()
    res = record(
        "cached", "alloc_iova_fast/free_iova_fast with warm range caches", (a, f), ba, 0.0, live
    )
    res.targets = {
        "alloc_p50<=1us": res.p50_ns <= 1_000,
        "free_p50<=1us": (res.free_p50_ns or 0) <= 1_000,
    }
    return results


def format_table(results: Sequence[Result]) -> str:
    """The human-readable table."""
    head = (
        f"{'workload':<11} {'ops':>6} {'p50_ns':>8} {'p99_ns':>8} {'free_p50':>9} "
        f"{'free_p99':>9} {'base_ops':>8} {'base_p50':>10} {'speedup':>8} {'B/entry':>8}  "
        "targets"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        fails = [k for k, ok in r.targets.items() if not ok]
        verdict = "all met" if not fails else "MISSED: " + ", ".join(fails)
        lines.append(
            f"{r.workload:<11} {r.ops:>6} {r.p50_ns:>8} {r.p99_ns:>8} "
            f"{r.free_p50_ns if r.free_p50_ns is not None else '-':>9} "
            f"{r.free_p99_ns if r.free_p99_ns is not None else '-':>9} {r.baseline_ops:>8} "
            f"{r.baseline_p50_ns:>10} {r.speedup:>8} {r.bytes_per_entry or '-':>8}  {verdict}"
        )
    lines.append("")
    lines += [f"{r.workload}: {r.description}; {r.live_entries} live entries" for r in results]
    lines.append(
        "baseline = pre-2026 rbtree walk (harness.dma.iova_baseline); where base_ops < "
        "ops it was sampled with fewer operations to bound its run time."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``harness bench iova`` and ``python -m harness.bench.iova``."""
    parser = argparse.ArgumentParser(prog="harness bench iova", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", action="store_true", help="print a JSON array, one object per workload"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    results = run(
        quick=args.quick,
        seed=args.seed,
        log=None if args.json else lambda s: print(f"# {s}", file=sys.stderr),
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(format_table(results))
        print(f"({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
