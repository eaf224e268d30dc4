"""The `harness dump-queue` rendering of a packed virtqueue (virtio 1.3 2.8) for people.

``harness.inspect_dump.render_dump`` hands a dump whose ``format`` is ``"packed"`` here. A packed
ring has no avail/used index rings: ownership lives in each descriptor's AVAIL (bit 7) and USED
(bit 15) flags read against wrap counters, so the view decodes every descriptor's owner from
those bits and the device's next position and wrap counter, shows both event suppression
structures (flags and off_wrap decoded), the chains popped and the chains available. Like the
split view it never trusts the reply's shape and keeps every line within 80 columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.inspect_format import (
    SHOW_CHAIN_DESCRIPTORS,
    SHOW_CHAINS,
    SHOW_DESCRIPTORS,
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
    size,
)
from harness.virtio import constants as C

_EVENT_FLAGS = {C.RING_EVENT_FLAGS_ENABLE: "ENABLE", C.RING_EVENT_FLAGS_DISABLE: "DISABLE",
                C.RING_EVENT_FLAGS_DESC: "DESC"}


def pos_wrap(value: int | None) -> str:
    """A position with its wrap counter in bit 15, as ``pos N wrap W``."""
    return "-" if value is None else f"pos {value & 0x7FFF} wrap {value >> 15 & 1}"


def event_text(event: Mapping[str, Any]) -> list[str]:
    """One event suppression structure: flags by name and off_wrap split (meant with DESC)."""
    flags, off_wrap = _int(event, "flags"), _int(event, "off_wrap")
    name = "-" if flags is None else _EVENT_FLAGS.get(flags, f"reserved {flags:#x}")
    return [f"flags {name}", f"off_wrap {_hex(off_wrap)} = {pos_wrap(off_wrap)}"]


def owner(i: int, flags: int, nxt: int, wrap: int, popped: frozenset[int]) -> str:
    """Who owns ring descriptor ``i``, from its AVAIL/USED bits against the device's next
    position ``nxt`` and wrap counter ``wrap`` (a slot before ``nxt`` is next read on the
    following lap, so it must carry the other wrap) and the slots where popped chains start.

    ``device avail``: available with the wrap the device reads it with, not read yet;
    ``device popped``: the head of a chain the device has read and not returned;
    ``used``: AVAIL == USED, a used element the device wrote, for the driver;
    ``driver``: available on a lap the device has read past (a chain's later descriptor: its
    used element went to the chain's first slot), the driver's to reuse."""
    a, u = int(bool(flags & C.DESC_F_AVAIL)), int(bool(flags & C.DESC_F_USED))
    if a == u:
        return f"used w{a}"
    if a == (wrap if i >= nxt else wrap ^ 1):
        return f"device avail w{a}"
    return f"device popped w{a}" if i in popped else f"driver w{a}"


def render_packed(dump: Mapping[str, Any], lines: list[str]) -> str:
    """The rest of a packed queue's view after the title ``lines``."""
    addr = _dict(dump, "addresses")
    lines += labelled("  rings", [f"desc {_hex(_int(addr, 'desc'))}",
                                  f"driver {_hex(_int(addr, 'driver'))}",
                                  f"device {_hex(_int(addr, 'device'))}"], indent=11)
    dev = _dict(dump, "device")
    nxt_raw = _int(dev, "last_avail")
    lines += labelled("  device", [
        f"next {pos_wrap(nxt_raw)}",
        f"used published {pos_wrap(_int(dev, 'used_idx'))}",
        f"{count(_int(dev, 'outstanding'))} chains popped",
        f"{count(_int(dev, 'used_unpublished'))} used unpublished",
        "kicks wanted" if dev.get("notify") is not False else "kicks off (DISABLE)",
    ], indent=11)
    error = dump.get("error")
    if isinstance(error, str) and error:
        lines += _wrapped("  ERROR", error)
    if "descriptors" not in dump:
        return "\n".join(lines)
    lines += labelled("  drv evt", event_text(_dict(dump, "driver_event")), indent=11)
    lines += labelled("  dev evt", event_text(_dict(dump, "device_event")), indent=11)
    popped = _dict(dev, "popped")
    parts = [f"id {k} at {pos_wrap(_int(popped, k))}" for k in popped]
    lines += labelled("  popped", parts or ["none"], indent=11)
    lines += _in_flight(_list(dump, "in_flight"))
    nxt = 0 if nxt_raw is None else nxt_raw & 0x7FFF
    wrap = 1 if nxt_raw is None else nxt_raw >> 15 & 1
    at = frozenset(v & 0x7FFF for v in popped.values() if isinstance(v, int))
    lines += _ring(_list(dump, "descriptors"), nxt, wrap, at)
    return "\n".join(lines)


def _in_flight(chains: list[Any]) -> list[str]:
    lines = [f"  available from next: {len(chains)} chains"]
    for c in chains[:SHOW_CHAINS]:
        if not isinstance(c, dict):
            continue
        lines.append(clip(
            f"    slot {count(_int(c, 'slot'))} id {count(_int(c, 'head'))} "
            f"{c.get('state', '?')}: {size(_int(c, 'read_len'))} out, "
            f"{size(_int(c, 'write_len'))} in"))
        descs = [d for d in _list(c, "descriptors") if isinstance(d, dict)]
        for d in descs[:SHOW_CHAIN_DESCRIPTORS]:
            where = "i" if d.get("indirect") is True else ""
            flags = _n(d, "flags") & ~(C.DESC_F_AVAIL | C.DESC_F_USED)
            shown = f" {desc_flags(flags)}" if flags else ""
            lines.append(clip(f"      [{where}{count(_int(d, 'desc'))}] "
                              f"{_hex(_int(d, 'addr'))} len {count(_int(d, 'len'))}{shown}"))
        if len(descs) > SHOW_CHAIN_DESCRIPTORS:
            lines.append(f"      ... {len(descs) - SHOW_CHAIN_DESCRIPTORS} more descriptors")
        error = c.get("error")
        if isinstance(error, str) and error:
            lines += _wrapped("      error", error, indent=13)
    if len(chains) > SHOW_CHAINS:
        lines.append(f"    ... {len(chains) - SHOW_CHAINS} more chains (--json has them all)")
    return lines


def _ring(descs: list[Any], nxt: int, wrap: int, popped: frozenset[int]) -> list[str]:
    """The descriptor ring, skipping never-written (all zero) slots."""
    shown = [(i, d) for i, d in enumerate(descs) if isinstance(d, dict) and any(
        _n(d, k) for k in ("addr", "len", "id", "flags"))]
    lines = [f"  descriptor ring: {len(shown)} of {len(descs)} not zero"]
    if shown:
        lines.append(f"  {'idx':>5} {'addr':<14} {'len':>6} {'id':>5} {'flags':<14} A U owner")
    for i, d in shown[:SHOW_DESCRIPTORS]:
        flags = _n(d, "flags")
        plain = desc_flags(flags & ~(C.DESC_F_AVAIL | C.DESC_F_USED))
        a, u = int(bool(flags & C.DESC_F_AVAIL)), int(bool(flags & C.DESC_F_USED))
        mark = " <- next" if i == nxt else ""
        lines.append(clip(f"  {i:>5} {_hex(_int(d, 'addr')):<14} {count(_int(d, 'len'), 6):>6}"
                          f" {count(_int(d, 'id'), 5):>5} {plain:<14} {a} {u} "
                          f"{owner(i, flags, nxt, wrap, popped)}{mark}"))
    if len(shown) > SHOW_DESCRIPTORS:
        lines.append(f"  ... {len(shown) - SHOW_DESCRIPTORS} more (--json has the whole ring)")
    return lines
