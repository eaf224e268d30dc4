"""harness.fuzz without a VM: argument errors, batching, the ledger split, the report."""

from __future__ import annotations

import itertools

import pytest

from harness import cli
from harness.fuzz import (
    FuzzResult,
    batches,
    parse_kv,
    reproduce_command,
    split_violations,
    summary,
    violation_delta,
)


@pytest.mark.parametrize("argv", [
    ["fuzz", "--iterations", "-5"],
    ["fuzz", "--iterations", "0"],
    ["fuzz", "--iterations", "many"],
    ["fuzz", "--iterations", "10", "--seed", "-1"],
    ["fuzz", "--iterations", "10", "--batch", "0"],
    ["fuzz", "--iterations", "10", "--first", "x"],
    ["fuzz", "--iterations", "10", "--seed", str(1 << 64)],
    ["fuzz"],
])
def test_bad_input_is_one_line_error(argv: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("harness fuzz: error:")]


def test_batches_cover_the_range_exactly() -> None:
    assert batches(0, 2500, 1000) == [(0, 1000), (1000, 1000), (2000, 500)]
    assert batches(7, 1, 1000) == [(7, 1)]
    got = batches(3, 10_001, 7)
    assert sum(n for _, n in got) == 10_001 and got[0][0] == 3
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(got))


def test_parse_kv_reads_the_last_line() -> None:
    text = "noise\nmode=fuzz seed=5 iterations=10 digest=00ff failed_iteration=-\n"
    kv = parse_kv(text)
    assert kv["iterations"] == "10" and kv["failed_iteration"] == "-"
    assert parse_kv("") == {}


def test_refused_guest_addresses_are_not_out_of_mapping() -> None:
    before = {"ledger": {"violations": {"unmapped_iova": 3}}}
    after = {"ledger": {"violations": {"unmapped_iova": 10, "out_of_bounds": 2, "leak": 1,
                                       "use_after_unmap": 0}}}
    delta = violation_delta(before, after)
    assert delta == {"unmapped_iova": 7, "out_of_bounds": 2, "leak": 1}
    refused, bad = split_violations(delta)
    assert refused == {"unmapped_iova": 7, "out_of_bounds": 2}
    assert bad == {"leak": 1}


def test_a_failure_names_seed_range_and_command() -> None:
    r = FuzzResult(seed=42, first=0, planned=5000, done=1234, batches=2,
                   failure="vnetraw exit 1: fuzz: status reads wrong", failed_range=(1234, 1))
    text = summary(r)
    assert "FAIL" in text and "seed 42, iterations 1234..1234" in text
    assert "harness fuzz --seed 42 --first 1234 --iterations 1" in text
    assert not r.ok


def test_a_clean_run_passes_only_with_traffic() -> None:
    r = FuzzResult(seed=1, first=0, planned=10, done=10, batches=1, elapsed=2.0,
                   refused={"unmapped_iova": 4}, traffic="ok (20 UDP echoes verified)")
    assert r.ok and r.rate == 5.0
    assert "PASS" in summary(r) and "out-of-mapping accesses         0" in summary(r)
    r.traffic = "not run"
    assert not r.ok
    r.traffic, r.out_of_mapping = "ok", {"leak": 1}
    assert not r.ok


def test_reproduce_command_keeps_the_kernel() -> None:
    from pathlib import Path

    assert reproduce_command(3, 10, 2, Path("/k/bzImage")) == (
        "harness fuzz --seed 3 --first 10 --iterations 2 --kernel /k/bzImage")
