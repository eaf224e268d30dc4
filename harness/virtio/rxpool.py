"""RxPool: the RX chains one receive queue has popped and mapped but not yet filled.

To receive a frame the device needs room for the largest frame it may get (with guest GSO 64
KiB: dozens of mergeable buffers) before it knows how long the frame is. The chains gathered
for that room and not used by the frame stay here, mapped, with the list of their buffers'
views (``views``, what ``readv`` fills), so the next frame starts from them: the used prefix is
dropped instead of the whole list rebuilt, and with ``HARNESS_RX_POOL=keep`` (the default) the
pool survives between readable events, so a 66-byte ACK no longer costs mapping and unmapping
the 20-40 chains of a 64 KiB room. ``call`` gives the unused chains back to the ring (``unpop``)
at the end of every readable event, the way the device worked before (the A/B's other side).

The chains are the queue's most recently popped ones, in ring order: only the RX path pops an
RX queue, so giving them back newest first is the ring's LIFO ``unpop``. They are in flight as
far as the driver, ``dump-queue`` and ``stats`` can tell (popped, ``outstanding``), which is
what a device holding buffers the driver made available is. Whenever the device may no longer
hold them the owner calls ``give_back`` (queue alive: unpop, or discard when broken) or, after
the queue itself was reset and has forgotten them, ``forget`` (unmap only): device and queue
reset, guest memory under a pooled buffer going away, a queue pair made inactive.
"""

from __future__ import annotations

from harness import knobs
from harness.dma import Direction, MapOps, sg_unmapper
from harness.virtio.chain import Chain, Virtqueue

#: HARNESS_RX_POOL=keep (default) keeps unused RX chains mapped across readable events;
#: ``call`` gives them back at the end of each one (the behaviour before, for A/B runs).
RX_POOL_ENV = "HARNESS_RX_POOL"


def rx_pool_keep() -> bool:
    """True for ``keep`` (the default), False for ``call``; ValueError for anything else, so
    a mistyped A/B side fails loudly."""
    return knobs.choice(RX_POOL_ENV, ("keep", "call"), "keep") == "keep"


class RxPool:
    """Popped, mapped, unused chains of one RX queue (``queue``) and their buffers' views."""

    __slots__ = ("cap", "chains", "queue", "views")

    def __init__(self) -> None:
        #: The queue object the chains were popped from (the transport may swap queue objects
        #: at FEATURES_OK; chains never outlive theirs).
        self.queue: Virtqueue | None = None
        self.chains: list[Chain] = []
        #: Every writable buffer of ``chains``, in order: what ``readv`` fills.
        self.views: list[memoryview] = []
        self.cap = 0  # sum of the chains' write_len

    def __len__(self) -> int:
        return len(self.chains)

    def add(self, q: Virtqueue, chain: Chain) -> None:
        """Append a chain just popped from ``q``."""
        self.queue = q
        self.chains.append(chain)
        self.views.extend(h.view for h in chain.writable)
        self.cap += chain.write_len

    def take(self, used: int) -> list[Chain]:
        """Remove and return the first ``used`` chains (a frame filled them); the views of the
        rest stay as they are."""
        chains = self.chains
        done = chains[:used]
        del chains[:used]
        # One plain loop, not two sum() generators: this runs per received frame (usually
        # one chain), where creating and draining a generator was ~6% of the server's time.
        nviews = 0
        cap = 0
        for c in done:
            nviews += len(c.writable)
            cap += c.write_len
        del self.views[:nviews]
        self.cap -= cap
        return done

    def _clear(self) -> list[Chain]:
        chains = self.chains
        self.chains = []
        self.views = []
        self.cap = 0
        self.queue = None
        return chains

    def give_back(self) -> int:
        """Return every chain to its live queue, newest first (ring LIFO): unpopped, so the
        driver's buffers are available again, or discarded (unmapped) when the queue is
        broken. The number given back."""
        q = self.queue
        chains = self._clear()
        if q is None:
            return 0
        for c in reversed(chains):
            if q.broken:
                q.discard(c)
            else:
                q.unpop(c)
        return len(chains)

    def forget(self, ops: MapOps) -> int:
        """The queue was reset (it no longer counts these chains): unmap their buffers with
        ``ops`` (the device's, which mapped them) so no mapping outlives the queue. The number
        forgotten."""
        chains = self._clear()
        unmap_sg = sg_unmapper(ops)
        for c in chains:
            if c.writable:
                unmap_sg(c.writable, Direction.FROM_DEVICE)
                c.writable = []
        return len(chains)

    def overlaps(self, iova: int, size: int) -> bool:
        """Whether a pooled buffer lies (partly) in [iova, iova + size)."""
        end = iova + size
        return any(h.iova < end and iova < h.iova + h.size
                   for c in self.chains for h in c.writable)
