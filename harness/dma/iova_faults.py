"""Injectable tree-node allocation failure for the IOVA domain (the kernel's GFP_ATOMIC failures).

The kernel's maple tree may need new nodes for a write (``mas_store_gfp(..., GFP_ATOMIC)``) and
that allocation can fail under memory pressure. The Python tree never runs out of memory, so the
domain asks a *node allocation hook* before every tree write instead; a hook that returns False
makes that write fail exactly as the kernel's would, before anything is changed.

Deliberate difference: the kernel only allocates when the write rebalances or splits a node
(an exact-fit slot store needs none). We ask on every write, so a test or the map-ops layer can
hit any operation deterministically; "needs no node" is then simply a hook that says yes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

__all__ = ["ERASE", "INSERT", "FailureInjector", "NodeAllocHook", "always_succeeds"]

INSERT = "insert"
ERASE = "erase"

NodeAllocHook = Callable[[str], bool]
"""Called with the kind of write (:data:`INSERT` or :data:`ERASE`); returns False to fail it."""


def always_succeeds(op: str) -> bool:
    """The default hook: node allocation never fails."""
    return True


class FailureInjector:
    """A node allocation hook that fails on demand or at random (seeded, so runs repeat).

    ``probability`` applies to every request whose kind is in ``ops``; :meth:`fail_next` queues
    forced failures that are served first. ``requests`` and ``failures`` count per kind.
    """

    def __init__(
        self, probability: float = 0.0, *, seed: int = 0, ops: Iterable[str] = (INSERT, ERASE)
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability {probability} not in [0, 1]")
        self.probability = probability
        self.ops = frozenset(ops)
        self._rng = random.Random(seed)
        self._forced: dict[str, int] = {}
        self.requests: dict[str, int] = {INSERT: 0, ERASE: 0}
        self.failures: dict[str, int] = {INSERT: 0, ERASE: 0}

    def fail_next(self, n: int = 1, op: str = ERASE) -> None:
        """Make the next ``n`` requests of kind ``op`` fail."""
        self._forced[op] = self._forced.get(op, 0) + n

    def __call__(self, op: str) -> bool:
        self.requests[op] = self.requests.get(op, 0) + 1
        forced = self._forced.get(op, 0)
        if forced:
            self._forced[op] = forced - 1
        elif not (op in self.ops and self.probability and self._rng.random() < self.probability):
            return True
        self.failures[op] = self.failures.get(op, 0) + 1
        return False
