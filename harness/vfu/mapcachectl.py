"""The DMA mapping cache at run time: its on/off switch and its counters (its C is mapcache.py's).

Apart from harness.vfu.mapcache because that module is the C source harness.vfu.build compiles,
so it must stay importable before the extension exists; this one needs the extension.
"""

from __future__ import annotations

from harness import knobs
from harness.vfu import mapcache
from harness.vfu._vfu import ffi, lib

#: HARNESS_MAP_CACHE=off: libvfio-user mmaps every DMA region itself (harness.vfu.mapcache).
MAP_CACHE_ENV = "HARNESS_MAP_CACHE"


def map_cache_on() -> bool:
    """False when HARNESS_MAP_CACHE=off, True for on (the default); ValueError for anything
    else, so a mistyped A/B side fails loudly."""
    return knobs.choice(MAP_CACHE_ENV, ("on", "off"), "on") == "on"


def map_cache_stats() -> dict[str, int]:
    """The mapping cache's counters for this process: hits, fallbacks, files mapped/released."""
    out = ffi.new("uint64_t[4]")
    lib.harness_map_cache_stats(out)
    return {name: int(out[i]) for i, name in enumerate(mapcache.STATS)}
