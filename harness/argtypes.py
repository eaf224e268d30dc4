"""argparse value parsers shared by the harness commands: a bad value is a one-line usage
error (ArgumentTypeError), never a traceback."""

from __future__ import annotations

import argparse
import math
import re

_SIZE = re.compile(r"^(\d+)([KMG]?)(i?B)?$", re.IGNORECASE)


def size(text: str) -> int:
    """'64M', '64MiB', '1048576' -> bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 64K, 64M)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    value = int(m.group(1)) * mult
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def memory_mb(text: str) -> int:
    """Guest RAM in MiB: at least 256 (the guest's kernel, initramfs and buffers)."""
    value = positive_int(text)
    if value < 256:
        raise argparse.ArgumentTypeError(f"at least 256 (MB), not {value}")
    return value


def mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise argparse.ArgumentTypeError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a MAC address: {text!r}") from None


def fault_spec(text: str) -> str:
    """Validate a fault-injection spec now, so a typo is a usage error and not a failed run."""
    from harness.dma.faults import FaultSpec

    try:
        FaultSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def seconds(text: str) -> float:
    """--watch, --exec-timeout: a positive, finite number of seconds (at least 0.1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0.1:
        raise argparse.ArgumentTypeError(f"must be at least 0.1 seconds: {text!r}")
    return value
