"""The CI recipe's JUnit merge: every job's suites in one file, totals added up."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _merge_module() -> object:
    spec = importlib.util.spec_from_file_location("merge_junit", REPO / ".ci/merge_junit.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merge_adds_up_suites_from_files(tmp_path: Path) -> None:
    a = tmp_path / "a.xml"
    a.write_text('<testsuites><testsuite name="x" tests="3" failures="1" errors="0" '
                 'skipped="1" time="1.5"><testcase name="t"/></testsuite></testsuites>')
    b = tmp_path / "b.xml"
    b.write_text('<testsuite name="y" tests="2" failures="0" errors="1" time="2"/>')
    out = tmp_path / "all.xml"
    mod = _merge_module()
    assert mod.main([str(out), str(a), str(b)]) == 0  # type: ignore[attr-defined]
    root = ET.parse(out).getroot()
    assert [s.get("name") for s in root] == ["x", "y"]
    assert (root.get("tests"), root.get("failures"), root.get("errors"),
            root.get("skipped"), root.get("time")) == ("5", "1", "1", "1", "3.500")
    assert mod.main([str(out), str(tmp_path / "missing.xml")]) == 1  # type: ignore[attr-defined]
