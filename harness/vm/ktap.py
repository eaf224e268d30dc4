"""Parse the guest's KTAP console output into test results and metrics.

The console also carries kernel log lines (possibly with timestamps) and ``\\r\\n`` endings;
anything that is not a top-level KTAP line we understand is kept as noise, never an error.
Metric lines look like ``# metric: <test> key=value ...``; ``# harness: done`` marks a clean end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

MetricValue = int | float | str

_KERNEL_PREFIX = re.compile(r"^\s*\[\s*\d+\.\d+\]\s?")
_VERSION = re.compile(r"(?:^|\s)(?:KTAP|TAP) version (\d+)\s*$")
_PLAN = re.compile(r"^1\.\.(\d+)\s*$")
_RESULT = re.compile(r"^(not ok|ok) (\d+)(?: -)?(?: ([^#]*?))?\s*(?:#\s*(.*?))?\s*$")
_METRIC = re.compile(r"^# metric: (\S+)(.*)$")
_PAIR = re.compile(r"(\w[\w.-]*)=(\"[^\"]*\"|\S*)")
#: The console protocol's two markers (docs/DESIGN.md, "Console protocol"): the first line
#: /init prints (the boot reached userspace: harness.vm.stall) and the clean end of its plan.
HEADER = "KTAP version 1"
DONE = "# harness: done"
_BAIL = re.compile(r"^Bail out!\s*(.*)$")


class Status(Enum):
    """Outcome of one test."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    TODO = "todo"


@dataclass
class TestResult:
    """One top-level KTAP result line plus the metrics reported under the same name."""

    number: int
    name: str
    status: Status
    reason: str = ""
    metrics: dict[str, MetricValue] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True for ok (including SKIP/TODO directives, as KTAP defines)."""
        return self.status is not Status.FAIL


@dataclass
class KtapReport:
    """Everything the guest said on the console."""

    version: int | None = None
    plan: int | None = None
    tests: list[TestResult] = field(default_factory=list)
    metrics: dict[str, dict[str, MetricValue]] = field(default_factory=dict)
    diagnostics: list[str] = field(default_factory=list)
    bail_out: str | None = None
    done: bool = False

    def by_name(self) -> dict[str, TestResult]:
        """Results keyed by test name (a repeated name keeps the last)."""
        return {t.name: t for t in self.tests}

    @property
    def missing(self) -> list[int]:
        """Planned test numbers that never reported a result."""
        if self.plan is None:
            return []
        seen = {t.number for t in self.tests}
        return [n for n in range(1, self.plan + 1) if n not in seen]

    @property
    def complete(self) -> bool:
        """Header, plan, every planned result and the done marker were all seen."""
        return self.version is not None and self.plan is not None and not self.missing and self.done

    @property
    def ok(self) -> bool:
        """Complete and no test failed."""
        return self.complete and self.bail_out is None and all(t.passed for t in self.tests)


def parse_value(text: str) -> MetricValue:
    """``"12"`` -> 12, ``"1.5"`` -> 1.5, quoted or other text stays a string."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    try:
        return int(text, 10)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_metrics(text: str) -> dict[str, MetricValue]:
    """``key=value`` pairs of a metric line."""
    return {m.group(1): parse_value(m.group(2)) for m in _PAIR.finditer(text)}


def _result(m: re.Match[str]) -> TestResult:
    directive = (m.group(4) or "").strip()
    word, _, rest = directive.partition(" ")
    status = Status.PASS if m.group(1) == "ok" else Status.FAIL
    reason = directive
    if word.upper() in ("SKIP", "TODO"):
        # KTAP: a directive overrides ok/not ok (TODO marks an expected failure).
        reason = rest.strip()
        status = Status.SKIP if word.upper() == "SKIP" else Status.TODO
    return TestResult(int(m.group(2)), (m.group(3) or "").strip(), status, reason)


def parse(text: str) -> KtapReport:
    """Parse a whole console log (partial logs give a report that is not ``complete``)."""
    report = KtapReport()
    for raw in text.replace("\r", "\n").split("\n"):
        line = _KERNEL_PREFIX.sub("", raw).rstrip()
        if not line:
            continue
        if report.version is None:
            # A kernel line may share the serial line with the header; find it anywhere.
            vm = _VERSION.search(line)
            if vm:
                report.version = int(vm.group(1))
            continue
        if line[0].isspace():
            continue  # indented subtest output: only the top level is reported
        if line == DONE:
            report.done = True
        elif pm := _PLAN.match(line):
            if report.plan is None:
                report.plan = int(pm.group(1))
        elif rm := _RESULT.match(line):
            report.tests.append(_result(rm))
        elif mm := _METRIC.match(line):
            report.metrics.setdefault(mm.group(1), {}).update(parse_metrics(mm.group(2)))
        elif bm := _BAIL.match(line):
            report.bail_out = bm.group(1)
        elif line.startswith("#"):
            report.diagnostics.append(line[1:].strip())
    for test in report.tests:
        test.metrics = dict(report.metrics.get(test.name, {}))
    return report
