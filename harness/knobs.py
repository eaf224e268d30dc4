"""The device server's environment switches (``HARNESS_*``, flipped by ``harness bench net
--ab``): read one that takes a value from a fixed set or a number of microseconds, or set
some for a while (``environment``).

A mistyped value must fail loudly (ValueError naming the choices) instead of quietly running
the default, which would make an A/B measure the default twice and call it a comparison.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager


def choice(name: str, choices: Sequence[str], default: str) -> str:
    """The value of environment variable ``name`` (unset or empty: ``default``); ValueError
    for anything not in ``choices``."""
    value = os.environ.get(name, "") or default
    if value not in choices:
        *rest, last = choices
        expected = f"{', '.join(rest)} or {last}" if rest else last
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return value


def microseconds(name: str, default: int, maximum: int) -> float:
    """The value of environment variable ``name`` in whole microseconds 0..``maximum`` (unset
    or empty: ``default``), returned in seconds; ValueError for anything else."""
    text = os.environ.get(name, "") or str(default)
    if not text.isdigit() or int(text) > maximum:
        raise ValueError(f"{name}={text!r}: expected microseconds 0..{maximum}")
    return int(text) / 1e6


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set these environment variables for the ``with`` block (what a child process started
    in it inherits, what a reader run in it sees), then restore each one as it was, unset if
    it was unset."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
