"""Progress of long steps for people: a tqdm bar on a terminal, one plain line per step otherwise.

Everything goes to stderr (stdout carries results: summaries, JSON). Lines are cut to fit an
80-column terminal. When nobody watches (not a terminal, or HARNESS_PROGRESS=plain) each step is
one line, so CI logs read as a list of what happened and when.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm

WIDTH = 80


def fit(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


class Progress:
    """Steps of one job: `step(text)` after each; `note(text)` for a line that is not a step."""

    def __init__(self, desc: str, total: int | None = None, *,
                 stream: IO[str] | None = None) -> None:
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.done = 0
        self.total = total
        mode = os.environ.get("HARNESS_PROGRESS", "auto")
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar: Any = None
        if mode != "plain" and tty:
            self._bar = tqdm(total=total, desc=desc, file=self.stream, ncols=WIDTH,
                             leave=False, bar_format="{desc}: {n_fmt}/{total_fmt} {bar} "
                             "{elapsed} {postfix}")

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def step(self, text: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(text[:30], refresh=False)
            self._bar.update(1)
        else:
            of = f"/{self.total}" if self.total else ""
            self._line(f"{self.desc} [{self.done}{of}] {text}")

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(fit(f"{self.desc}: {text}"), file=self.stream)
        else:
            self._line(f"{self.desc}: {text}")

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(fit(f"{text}  ({elapsed:.0f} s)"), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
