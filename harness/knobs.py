"""The device server's environment switches (``HARNESS_*``, flipped by ``harness bench net
--ab``): read one that takes a value from a fixed set.

A mistyped value must fail loudly (ValueError naming the choices) instead of quietly running
the default, which would make an A/B measure the default twice and call it a comparison.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def choice(name: str, choices: Sequence[str], default: str) -> str:
    """The value of environment variable ``name`` (unset or empty: ``default``); ValueError
    for anything not in ``choices``."""
    value = os.environ.get(name, "") or default
    if value not in choices:
        *rest, last = choices
        expected = f"{', '.join(rest)} or {last}" if rest else last
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return value
