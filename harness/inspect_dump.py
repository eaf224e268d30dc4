"""The `harness dump-queue` rendering of one virtqueue for people: a split ring here, a packed
one handed on to ``harness.inspect_packed``.

A split queue shows its state line, ring addresses, the device's indices, both rings' flags and
event indices, the chains in flight with their descriptors, the last few entries of the avail
and used rings and the non-zero descriptors, each list cut at a ``SHOW_*`` limit (--json has
everything). It never trusts the reply's shape and keeps every line within 80 columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.inspect_format import (
    SHOW_CHAIN_DESCRIPTORS,
    SHOW_CHAINS,
    SHOW_DESCRIPTORS,
    SHOW_RING,
    _dict,
    _hex,
    _int,
    _list,
    _n,
    _wrapped,
    clip,
    count,
    desc_flags,
    labelled,
    pack,
    size,
)
from harness.inspect_packed import render_packed
from harness.virtio import constants as C


def render_dump(dump: Mapping[str, Any], device: str = "net0") -> str:
    """A `dump-queue` reply's ``dump`` for people; every line at most 80 columns."""
    lines: list[str] = []
    size_ = _int(dump, "size")
    head = [f"{dump.get('format', 'split')} size {count(size_)}",
            "broken" if dump.get("broken") is True else
            "enabled" if dump.get("enabled") is True else "not enabled"]
    if dump.get("event_idx") is True:
        head.append("EVENT_IDX")
    if dump.get("indirect") is True:
        head.append("INDIRECT_DESC")
    vector = _int(dump, "msix_vector")
    head.append("no MSI-X vector" if vector == C.NO_VECTOR else f"MSI-X vector {count(vector)}")
    title = f"{device} queue {dump.get('index', '?')} ({dump.get('name', '?')}): "
    lines += pack(title, head)
    if dump.get("format") == "packed":  # no index rings: flags and wrap counters instead
        return render_packed(dump, lines)
    addr = _dict(dump, "addresses")
    lines += labelled("  rings", [f"desc {_hex(_int(addr, 'desc'))}",
                                  f"avail {_hex(_int(addr, 'avail'))}",
                                  f"used {_hex(_int(addr, 'used'))}"], indent=11)
    dev = _dict(dump, "device")
    lines += labelled("  device", [
        f"avail idx {count(_int(dev, 'avail_idx'))} (as last read)",
        f"last_avail {count(_int(dev, 'last_avail'))}",
        f"used idx {count(_int(dev, 'used_idx'))}",
        f"{count(_int(dev, 'outstanding'))} chains popped",
        "kicks wanted" if dev.get("notify") is not False else "kicks off (NO_NOTIFY)",
    ], indent=11)
    error = dump.get("error")
    if isinstance(error, str) and error:
        lines += _wrapped("  ERROR", error)
    avail = _dict(dump, "avail")
    used = _dict(dump, "used")
    if not avail and not used:
        return "\n".join(lines)
    lines += labelled("  avail", [f"flags {_hex(_int(avail, 'flags'))}",
                                  f"idx {count(_int(avail, 'idx'))}",
                                  f"used_event {count(_int(avail, 'used_event'))}"], indent=11)
    lines += labelled("  used", [f"flags {_hex(_int(used, 'flags'))}",
                                 f"idx {count(_int(used, 'idx'))}",
                                 f"avail_event {count(_int(used, 'avail_event'))}"], indent=11)
    lines += _render_in_flight(_list(dump, "in_flight"))
    lines += _render_rings(avail, used, size_ or 0)
    lines += _render_descriptors(_list(dump, "descriptors"))
    return "\n".join(lines)


def _render_in_flight(chains: list[Any]) -> list[str]:
    states: dict[str, int] = {}
    for c in chains:
        state = c.get("state", "?") if isinstance(c, dict) else "?"
        states[str(state)] = states.get(str(state), 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in states.items())
    lines = [clip(f"  in flight: {len(chains)} chains" + (f" ({summary})" if summary else ""))]
    for c in chains[:SHOW_CHAINS]:
        if not isinstance(c, dict):
            continue
        lines.append(clip(
            f"    idx {count(_int(c, 'idx'))} slot {count(_int(c, 'slot'))} head "
            f"{count(_int(c, 'head'))} {c.get('state', '?')}: {size(_int(c, 'read_len'))} out, "
            f"{size(_int(c, 'write_len'))} in"))
        descs = [d for d in _list(c, "descriptors") if isinstance(d, dict)]
        for d in descs[:SHOW_CHAIN_DESCRIPTORS]:
            lines.append(clip("      " + _desc_line(d)))
        if len(descs) > SHOW_CHAIN_DESCRIPTORS:
            lines.append(f"      ... {len(descs) - SHOW_CHAIN_DESCRIPTORS} more descriptors")
        error = c.get("error")
        if isinstance(error, str) and error:
            lines += _wrapped("      error", error, indent=13)
    if len(chains) > SHOW_CHAINS:
        lines.append(f"    ... {len(chains) - SHOW_CHAINS} more chains (--json has them all)")
    return lines


def _desc_line(d: Mapping[str, Any]) -> str:
    flags = _n(d, "flags")
    where = "i" if d.get("indirect") is True else ""
    nxt = f" -> {_n(d, 'next')}" if flags & C.DESC_F_NEXT else ""
    shown = f" {desc_flags(flags)}" if flags else ""
    return (f"[{where}{count(_int(d, 'desc'))}] {_hex(_int(d, 'addr'))} len "
            f"{count(_int(d, 'len'))}{shown}{nxt}")


def _render_rings(avail: Mapping[str, Any], used: Mapping[str, Any], qsize: int) -> list[str]:
    """The last few entries the driver published and the device returned, by ring index."""
    lines: list[str] = []
    ring = _list(avail, "ring")
    idx = _int(avail, "idx")
    if idx is not None and qsize and len(ring) == qsize:
        n = min(SHOW_RING, qsize, idx or qsize)  # idx < n: fewer published (or it wrapped)
        parts = [f"{(idx - k) & 0xFFFF}:{ring[(idx - k) % qsize]}" for k in range(n, 0, -1)]
        lines += pack(f"  avail ring, last {n} (idx:head) ", parts, sep=" ")
    uring = _list(used, "ring")
    uidx = _int(used, "idx")
    if uidx is not None and qsize and len(uring) == qsize:
        n = min(SHOW_RING, qsize, uidx or qsize)
        parts = []
        for k in range(n, 0, -1):
            e = uring[(uidx - k) % qsize]
            shown = f"{e[0]}/{e[1]}" if isinstance(e, list) and len(e) == 2 else "?"
            parts.append(f"{(uidx - k) & 0xFFFF}:{shown}")
        lines += pack(f"  used ring, last {n} (idx:id/len) ", parts, sep=" ")
    return lines


def _render_descriptors(descs: list[Any]) -> list[str]:
    used = [(i, d) for i, d in enumerate(descs) if isinstance(d, dict) and any(
        _n(d, k) for k in ("addr", "len", "flags", "next"))]
    lines = [f"  descriptors: {len(used)} of {len(descs)} not zero"]
    if used:
        lines.append(f"  {'idx':>5}  {'addr':<18} {'len':>10}  {'flags':<19} {'next':>5}")
    for i, d in used[:SHOW_DESCRIPTORS]:
        lines.append(clip(f"  {i:>5}  {_hex(_int(d, 'addr')):<18} {count(_int(d, 'len'), 10):>10}"
                          f"  {desc_flags(_n(d, 'flags')):<19} {count(_int(d, 'next'), 5):>5}"))
    if len(used) > SHOW_DESCRIPTORS:
        lines.append(f"  ... {len(used) - SHOW_DESCRIPTORS} more (--json has the whole table)")
    return lines
