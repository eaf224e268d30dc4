"""build_mapops: the one place that assembles a run's map-ops stack from its options.

Stack, bottom up: DirectMapOps or BounceMapOps over GuestMemory; FaultInjectingMapOps when a
fault spec injects anything; DmaLedger on top, so it audits what the device asks for before any
fault is injected and sees injected failures as (transient) failed maps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from harness import knobs
from harness.dma.bounce import DEFAULT_WINDOW, BounceMapOps
from harness.dma.faults import FaultInjectingMapOps, FaultSpec
from harness.dma.ledger import DmaLedger
from harness.dma.mapops import DirectMapOps, MapOps
from harness.dma.memory import GuestMemory

log = logging.getLogger(__name__)

MAPOPS_KINDS = ("direct", "bounce")
#: HARNESS_LEDGER=off in the device server's environment makes the ledger a pass-through, to
#: measure what its checks cost (harness bench net). Never for a run whose results count.
LEDGER_ENV = "HARNESS_LEDGER"


def ledger_checks() -> bool:
    """True for ``on`` (the default), False for ``off``; ValueError for anything else: a typo
    must not quietly run the checks on the side meant to price them."""
    return knobs.choice(LEDGER_ENV, ("on", "off"), "on") == "on"


def build_mapops(
    kind: str,
    memory: GuestMemory,
    *,
    bus_master: Callable[[], bool],
    faults: FaultSpec | None = None,
    ledger: bool = True,
    bounce_window: int = DEFAULT_WINDOW,
) -> tuple[MapOps, DmaLedger | None]:
    """The map ops the device should use, and the ledger in it (None when ``ledger`` is off).

    ``kind`` is "direct" or "bounce". The returned MapOps also has ``housekeeping()`` (call once
    per server loop turn) and ``stats()``.
    """
    spec = faults if faults is not None else FaultSpec()
    injector = spec.node_alloc_injector()
    base: MapOps
    if kind == "direct":
        if injector is not None:
            log.warning(
                "fault iova-alloc needs --map-ops bounce (direct has no IOVA domain "
                "to allocate from): not injected"
            )
            injector = None
        base = DirectMapOps(memory)
    elif kind == "bounce":
        # With iova-alloc injected, bypass the range caches: otherwise steady traffic never
        # writes the tree and the injected failures (and deferred erases) would never happen.
        base = BounceMapOps(
            memory, window=bounce_window, node_alloc=injector, rcache=injector is None
        )
    else:
        raise ValueError(f"unknown map ops {kind!r} (known: {', '.join(MAPOPS_KINDS)})")
    ops: MapOps = base
    if spec.active:
        ops = FaultInjectingMapOps(ops, spec, injector=injector)
    if not ledger:
        return ops, None
    checks = ledger_checks()
    if not checks:
        log.warning("%s=off: the DMA ledger checks nothing (a benchmark's ledger-off side)",
                    LEDGER_ENV)
    audit = DmaLedger(ops, memory, bus_master=bus_master, checks=checks)
    return audit, audit
