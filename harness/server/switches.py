"""Every environment switch the device server reads (``HARNESS_*``), with its reader: one
table, so that the server reads them all before it starts (a mistyped value is one error
line, not a traceback halfway through start-up) and ``harness bench net --ab`` refuses a name
or a value the server would refuse before it boots anything.

The switches themselves stay beside the code they steer; this module only lists them.
"""

from __future__ import annotations

from collections.abc import Callable

from harness import knobs
from harness.dma.factory import LEDGER_ENV, ledger_checks
from harness.dma.regionindex import INDEX_ENV, index_kind
from harness.server.loop import (
    ORDER_ENV,
    POLL_MODE_ENV,
    POLL_US_ENV,
    dma_poll,
    endpoint_first,
    poll_mode,
)
from harness.vfu.mapcachectl import MAP_CACHE_ENV, map_cache_on
from harness.vfu.wire import WIRE_TAKE_ENV, wire_take_fast
from harness.virtio.fastpath import fast_directions, rx_publish_each
from harness.virtio.netdefs import (
    BATCH_USED_ENV,
    FAST_RX_ENV,
    FAST_TX_ENV,
    RX_PUBLISH_ENV,
    TX_HOLDOFF_ENV,
    batch_used,
    tx_holdoff,
)
from harness.virtio.rxpool import RX_POOL_ENV, rx_pool_keep

#: Name -> the reader that parses it (ValueError naming what it expects for a bad value).
READERS: dict[str, Callable[[], object]] = {
    BATCH_USED_ENV: batch_used,
    FAST_RX_ENV: fast_directions,
    FAST_TX_ENV: fast_directions,
    INDEX_ENV: index_kind,
    LEDGER_ENV: ledger_checks,
    MAP_CACHE_ENV: map_cache_on,
    ORDER_ENV: endpoint_first,
    POLL_MODE_ENV: poll_mode,
    POLL_US_ENV: dma_poll,
    RX_POOL_ENV: rx_pool_keep,
    RX_PUBLISH_ENV: rx_publish_each,
    TX_HOLDOFF_ENV: tx_holdoff,
    WIRE_TAKE_ENV: wire_take_fast,
}
#: The names, sorted (what `bench net --ab` may flip).
NAMES = tuple(sorted(READERS))


def read_all() -> None:
    """Read every switch from this process's environment; ValueError for the first bad one."""
    for reader in dict.fromkeys(READERS.values()):
        reader()


def check(name: str, value: str) -> None:
    """ValueError unless ``name`` is a switch and the server would take ``value`` for it."""
    reader = READERS.get(name)
    if reader is None:
        raise ValueError(f"{name}: not a device server knob (known: {', '.join(NAMES)})")
    with knobs.environment({name: value}):
        reader()
