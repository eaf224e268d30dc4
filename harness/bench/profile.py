"""Summarise py-spy's collapsed stacks (``harness bench net --profile DIR``): where time goes.

``python -m harness.bench.profile FILE... [--top N]`` prints, over all samples of the files,
the functions with the most self time (the frame on top of the stack) and with the most
inclusive time (anywhere on the stack), as percentages of the samples. Line numbers are
dropped, so one function is one row whatever line was executing.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Profile", "main", "parse"]

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


def _name(frame: str) -> str:
    """``func (path/to/mod.py:12)`` -> ``mod.py:func``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{Path(m['file']).name}:{m['func']}"


class Profile:
    """Sample counts: total, self and inclusive per function."""

    def __init__(self) -> None:
        self.total = 0
        self.self_: Counter[str] = Counter()
        self.inclusive: Counter[str] = Counter()

    def add(self, stack: list[str], count: int) -> None:
        self.total += count
        names = [_name(f) for f in stack]
        if names:
            self.self_[names[-1]] += count
        for n in set(names):
            self.inclusive[n] += count

    def top(self, which: str, n: int) -> list[tuple[str, float]]:
        counts = self.self_ if which == "self" else self.inclusive
        return [(k, 100.0 * v / self.total) for k, v in counts.most_common(n)] \
            if self.total else []


def parse(lines: Iterable[str], into: Profile | None = None) -> Profile:
    """Collapsed lines ``frame;frame;... COUNT`` (the first frame may be a thread label)."""
    prof = into if into is not None else Profile()
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames and not _FRAME.match(frames[0].strip()):
            frames = frames[1:]  # "process 123:"/"thread (0x...)" labels
        prof.add(frames, int(count))
    return prof


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench.profile", description=__doc__)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    prof = Profile()
    for f in args.files:
        try:
            parse(f.read_text().splitlines(), prof)
        except OSError as exc:
            print(f"harness.bench.profile: {exc}", file=sys.stderr)
            return 2
    print(f"{prof.total} samples in {len(args.files)} file(s)")
    for which in ("self", "inclusive"):
        print(f"\n{which:>9}  function")
        for name, pct in prof.top(which, args.top):
            print(f"{pct:8.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
