"""Kernel verdicts: what the guest kernel said on its console that no test result shows.

Oopses, BUGs, WARNINGs, KASAN/UBSAN/KFENCE reports, soft and hard lockups, hung tasks, RCU
stalls and panics are each a failed case of their own (`kernel_<kind>`), carrying the console
excerpt that proves it, as syzkaller's and KUnit's runners report them. WARNINGs can be
downgraded (`--allow-warnings`): then they pass with the excerpt kept as detail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.report import Case

#: (kind, pattern), most specific first: a line counts for the first kind that matches it.
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(rx)) for kind, rx in (
        ("kasan", r"BUG: KASAN: "),
        ("kfence", r"BUG: KFENCE: "),
        ("ubsan", r"UBSAN: "),
        ("soft_lockup", r"BUG: soft lockup"),
        ("hard_lockup", r"[Hh]ard LOCKUP"),
        ("hung_task", r"INFO: task \S+ blocked for more than \d+ seconds"),
        ("rcu_stall", r"rcu: INFO: \S+ (self-)?detected stalls?|rcu_\w+ detected stalls"),
        ("oops", r"Oops: |BUG: unable to handle |general protection fault"),
        ("bug", r"kernel BUG at |BUG: "),
        ("warning", r"WARNING: CPU: \d+ PID: \d+ at |WARNING: .* at .*\+0x"),
        ("panic", r"Kernel panic - not syncing"),
    ))
EXCERPT_BEFORE = 2
EXCERPT_AFTER = 25


@dataclass(frozen=True)
class Finding:
    kind: str
    count: int
    first_line: int  # 1-based line of the console log
    excerpt: str


def scan(console: str) -> list[Finding]:
    """Every kind of report in the console text, with its first occurrence's excerpt."""
    lines = console.splitlines()
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for i, line in enumerate(lines):
        for kind, rx in PATTERNS:
            if rx.search(line):
                counts[kind] = counts.get(kind, 0) + 1
                first.setdefault(kind, i)
                break
    out = []
    for kind, i in sorted(first.items(), key=lambda kv: kv[1]):
        excerpt = "\n".join(lines[max(0, i - EXCERPT_BEFORE): i + EXCERPT_AFTER])
        out.append(Finding(kind, counts[kind], i + 1, excerpt))
    return out


def kernel_cases(console: str, *, allow_warnings: bool = False) -> list[Case]:
    """One failed case per kind found; one passing `kernel_clean` case when nothing was."""
    findings = scan(console)
    if not findings:
        return [Case("kernel_clean", True, "no oops, BUG, WARNING, sanitizer report, lockup, "
                                           "hung task, RCU stall or panic on the console")]
    cases = []
    for f in findings:
        head = f.excerpt.splitlines()[EXCERPT_BEFORE] if f.first_line > EXCERPT_BEFORE \
            else f.excerpt.splitlines()[0]
        detail = f"{f.count}x, first at console line {f.first_line}: {head.strip()}"
        ok = f.kind == "warning" and allow_warnings
        cases.append(Case(f"kernel_{f.kind}", ok,
                          ("allowed (--allow-warnings): " if ok else "") + detail,
                          {"excerpt": f.excerpt, "count": f.count, "line": f.first_line}))
    return cases
