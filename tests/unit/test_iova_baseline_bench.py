"""The pre-2026 baseline allocator and a smoke run of ``harness bench iova --quick``."""

from __future__ import annotations

import json

import pytest

from harness.bench import iova as bench
from harness.dma.iova import IovaDomain
from harness.dma.iova_baseline import BaselineIovaDomain

L32 = (1 << 20) - 1


def test_baseline_matches_on_plain_top_down() -> None:
    ours, old = IovaDomain(4096, 1), BaselineIovaDomain(4096, 1)
    # Same sizes only: with mixed sizes the old walk leaves alignment holes behind its cached
    # node that the new allocator (highest fit) fills, so the two legitimately differ.
    for size in [4] * 100 + [1] * 100:
        a, b = ours.alloc_iova(size, L32, True), old.alloc_iova(size, L32, True)
        assert a is not None and b is not None and a.pfn_lo == b.pfn_lo


def test_baseline_walks_linearly_through_holes() -> None:
    old = BaselineIovaDomain(4096, 1)
    pages = [old.alloc_iova(1, L32) for _ in range(401)]
    for p in pages[1::2]:
        assert p is not None
        old.free_iova(p.pfn_lo)
    top = pages[0]
    assert top is not None
    old.free_iova(top.pfn_lo)
    assert old.alloc_iova(1, L32) is not None
    steps = old.walk_steps
    assert old.alloc_iova(2, L32, True) is not None
    assert old.walk_steps - steps >= 200  # one step per entry: the cost the new tree removes
    with pytest.raises(KeyError):
        old.free_iova(5)


def test_bench_quick_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["workload"] for r in rows] == ["steady", "fragmented", "limit32", "cached"]
    for r in rows:
        for key in ("p50_ns", "p99_ns", "baseline_p50_ns", "speedup", "bytes_per_entry"):
            assert key in r
        assert r["p50_ns"] > 0 and r["baseline_p50_ns"] > 0


def test_bench_quick_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick"]) == 0
    assert "fragmented" in capsys.readouterr().out
