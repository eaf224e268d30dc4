#!/usr/bin/env python3
"""Merge JUnit XML files (one per CI job or pytest-xdist group) into one <testsuites> file.

Usage: python3 .ci/merge_junit.py OUT.xml IN.xml [IN.xml ...]   (stdlib only)
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def merge(paths: list[str]) -> ET.Element:
    out = ET.Element("testsuites")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    time = 0.0
    for path in paths:
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            out.append(suite)
            for key in totals:
                totals[key] += int(suite.get(key, "0"))
            time += float(suite.get("time", "0") or 0)
    for key, value in totals.items():
        out.set(key, str(value))
    out.set("time", f"{time:.3f}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        root = merge(argv[1:])
    except (OSError, ET.ParseError) as exc:
        print(f"merge_junit: {exc}", file=sys.stderr)
        return 1
    ET.ElementTree(root).write(argv[0], encoding="utf-8", xml_declaration=True)
    print(f"{argv[0]}: {root.get('tests')} tests, {root.get('failures')} failures, "
          f"{root.get('errors')} errors, {root.get('skipped')} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
