"""Shows every guest run's summary at the end of the pytest output (CI logs read like vm-test)."""

from __future__ import annotations

import os

import pytest

from harness.report import RunResult, summary

SUMMARIES: list[tuple[str, str]] = []


def record(label: str, result: RunResult) -> None:
    SUMMARIES.append((label, summary(result)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SUMMARIES:
        return
    terminalreporter.section("guest runs")
    for label, text in SUMMARIES:
        terminalreporter.write_line(f"[{label}]")
        for line in text.splitlines():
            terminalreporter.write_line(line)


def need_root() -> None:
    """VM tests create network namespaces and TAP devices: without root they skip, saying so."""
    if os.geteuid() != 0:
        pytest.skip("VM tests need root (network namespaces, TAP devices)")
