"""The text-formatting helpers shared by the `harness stats` and `harness dump-queue` renderings.

Lookups that never trust a reply's shape (``_dict``, ``_int``, ``_n``, ``_list``: a missing or
odd field is empty, None or 0), counters and byte sizes squeezed into a column, the device
status and descriptor flags by name, and line packing that keeps every line within
:data:`WIDTH` columns. ``harness.inspect`` (stats), ``harness.inspect_dump`` (a split queue) and
``harness.inspect_packed`` (a packed queue) render with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from harness.virtio import constants as C

WIDTH = 80
#: How much of a dump the text rendering shows, split or packed (--json has everything).
SHOW_CHAINS = 32
SHOW_CHAIN_DESCRIPTORS = 8
SHOW_DESCRIPTORS = 32
SHOW_RING = 8

_STATUS_BITS = ((C.STATUS_ACKNOWLEDGE, "ACK"), (C.STATUS_DRIVER, "DRIVER"),
                (C.STATUS_FEATURES_OK, "FEATURES_OK"), (C.STATUS_DRIVER_OK, "DRIVER_OK"),
                (C.STATUS_NEEDS_RESET, "NEEDS_RESET"), (C.STATUS_FAILED, "FAILED"))
_DESC_FLAGS = ((C.DESC_F_NEXT, "NEXT"), (C.DESC_F_WRITE, "WRITE"),
               (C.DESC_F_INDIRECT, "INDIRECT"))


def _dict(data: object, key: str) -> dict[str, Any]:
    value = data.get(key) if isinstance(data, Mapping) else None
    return value if isinstance(value, dict) else {}


def _int(data: object, key: str) -> int | None:
    value = data.get(key) if isinstance(data, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _n(data: object, key: str) -> int:
    return _int(data, key) or 0


def _list(data: object, key: str) -> list[Any]:
    value = data.get(key) if isinstance(data, Mapping) else None
    return value if isinstance(value, list) else []


def count(n: int | None, width: int = 0) -> str:
    """A counter in at most ``width`` characters: 1234567 -> '1234567' or '1.2M'."""
    if n is None:
        return "-"
    text = str(n)
    if not width or len(text) <= width:
        return text
    value = float(n)
    for suffix in ("k", "M", "G", "T", "P", "E"):
        value /= 1000
        for digits in (1, 0):
            text = f"{value:.{digits}f}{suffix}"
            if len(text) <= width:
                return text
    return "#" * width


def things(n: int | None, what: str) -> str:
    """'1 region', '3 regions', '- regions'."""
    return f"{count(n)} {what}" if n == 1 else f"{count(n)} {what}s"


def size(n: int | None) -> str:
    """Bytes for people: 512 -> '512 B', 1536 -> '1.5 KiB', 3 << 30 -> '3.0 GiB'."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def _short_size(n: int | None, width: int) -> str:
    """Bytes in a table cell: 'B'-less units, e.g. '1.5K', '3.0G'."""
    if n is None:
        return "-"
    if len(str(n)) <= width:
        return str(n)
    value = float(n)
    for unit in "KMGTPE":
        value /= 1024
        text = f"{value:.1f}{unit}"
        if len(text) <= width:
            return text
        if len(f"{value:.0f}{unit}") <= width:
            return f"{value:.0f}{unit}"
    return "#" * width


def status_text(status: int | None) -> str:
    if status is None:
        return "status -"
    names = [name for bit, name in _STATUS_BITS if status & bit]
    return f"status {status:#04x} ({' '.join(names) or 'reset'})"


def desc_flags(flags: int) -> str:
    names = [name for bit, name in _DESC_FLAGS if flags & bit]
    rest = flags & ~(C.DESC_F_NEXT | C.DESC_F_WRITE | C.DESC_F_INDIRECT)
    if rest:
        names.append(f"{rest:#x}")
    return ",".join(names) or "-"


def clip(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def pack(first: str, tokens: Iterable[str], *, pad: str = "    ", sep: str = ", ") -> list[str]:
    """``first`` then ``tokens`` joined by ``sep``, wrapped onto lines of at most 80 columns
    that start with ``pad``; a token too long for any line is clipped."""
    lines: list[str] = []
    line = clip(first)
    fresh = True  # no token on this line yet
    for raw in tokens:
        tok = clip(raw, WIDTH - len(pad))
        add = tok if fresh else sep + tok
        if len(line) + len(add) > WIDTH and line.strip():
            lines.append(line.rstrip())
            line, add = pad, tok
        line += add
        fresh = False
    lines.append(line.rstrip())
    return lines


def labelled(label: str, parts: Iterable[str], indent: int = 9) -> list[str]:
    """``label`` in a column of ``indent`` characters, then ``parts`` joined by ', '."""
    first = f"{label:<{indent - 1}} " if len(label) < indent else f"{label} "
    return pack(first, parts, pad=" " * max(indent, 4))


def _hex(n: int | None) -> str:
    return "-" if n is None else f"{n:#x}"


def _wrapped(label: str, text: str, indent: int = 11) -> list[str]:
    """Free text after a label, wrapped at spaces to 80 columns."""
    first = f"{label:<{indent - 1}} " if len(label) < indent else f"{label} "
    return pack(first, text.split(), pad=" " * indent, sep=" ")
