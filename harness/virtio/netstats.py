"""NetStats: what virtio-net reports about itself, its counters and its queues' rings.

``stats()`` is the device's part of ``harness stats`` (per-queue counters and ring state, their
totals, and the device-level counters: link, pairs, pools, the C bursts, drops, misbehaviours);
``dump_queue()`` decodes one queue's rings for ``harness inspect``. Neither is on a per-frame
path. The device (harness.virtio.net.VirtioNetDevice) is a NetStats; the state read here is set
up by its constructor and transport hooks (declared in harness.virtio.netrx.NetRxPath, and here
for what only the device's own half has).
"""

from __future__ import annotations

from typing import Any

from harness.virtio import constants as C
from harness.virtio.chain import QueueStats
from harness.virtio.netrx import NetRxPath
from harness.virtio.nettimers import TxTimers


class NetStats(NetRxPath):
    """VirtioNetDevice's ``stats()`` and ``dump_queue()``."""

    # Set by VirtioNetDevice.__init__.
    timers: TxTimers
    _ctrl_index: int
    link_changes: int
    driver_ok_features: int

    # ---- stats -------------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Per-queue counters, their totals, and device-level counters."""
        per: dict[str, dict[str, int | bool]] = {}
        totals: dict[str, int] = {}
        fp = self.fastpath
        for q in self.queues:
            d = {name: getattr(q.stats, name) for name in QueueStats.__slots__}
            for k, v in d.items():
                totals[k] = totals.get(k, 0) + v
            # Ring indices and queue state next to the counters (not summed into totals).
            per[q.name] = {**d, **q.ring_state()}
        return {
            **per,
            "totals": totals,
            "errors": totals["errors"],
            "device_errors": self.device_errors,
            "bad_accesses": self.bad_accesses,
            "resets": self.resets,
            "queue_resets": self.queue_resets,
            "status": self.status,
            "needs_reset": bool(self.status & C.STATUS_NEEDS_RESET),
            "features": self.negotiated,
            "rx_starved": self._rx_starved[0],
            # Chains each pair's RX pool holds popped and mapped (in rxN's ``outstanding``);
            # not a dict: ``harness stats`` shows every dict of this level as a queue row.
            "rx_pool": "keep" if self.rx_pool_keep else "call",
            "rx_pool_held": [len(p) for p in self._rx_pools],
            # TX chains and RX frames the C bursts completed (harness.virtio.fastpath); -1: off.
            "tx_fast_chains": -1 if fp is None or not fp.tx_on else fp.tx_chains,
            "rx_fast_frames": -1 if fp is None or not fp.rx_on else fp.rx_frames,
            **({"pairs": {"max": self.max_pairs, "active": self.control.pairs,
                          "rx_starved": list(self._rx_starved)}}
               if self.device_features >> C.NET_F_MQ & 1 else {}),
            "link_up": self.link_up,
            "link_changes": self.link_changes,
            "link_drops": self.link_drops,
            "reset_drops": self.reset_drops,
            "oversize_drops": self.oversize_drops,
            **self.timers.stats(),
            "header_drops": self.header_drops,
            "filtered": self.filtered,
            **({"ctrl": self.control.as_dict()} if self.num_queues > self._ctrl_index else {}),
            "driver_ok_features": self.driver_ok_features,
            "csum_completed": self.csum_completed,
            **({"misbehave": self.misbehave.state()} if self.misbehave is not None else {}),
        }

    def dump_queue(self, index: int) -> dict[str, Any]:
        """Queue ``index``'s rings and in-flight chains decoded (``Virtqueue.dump``).

        LookupError (its message says why) when there is no such queue or it is not enabled.
        With Bus Master Enable clear the dump reads only the ring views already held.
        """
        if not 0 <= index < self.num_queues:
            names = ", ".join(f"{q.index} {q.name}" for q in self.queues)
            raise LookupError(f"no queue {index} (queues: {names})")
        q = self.queues[index]
        if not q.enabled:
            raise LookupError(f"queue {index} ({q.name}) is not enabled")
        return q.dump(may_map=self.bus_master())
