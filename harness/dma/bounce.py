"""BounceMapOps: map ops that give the device bounce buffers only (VDUSE's bounce domain).

Every streaming mapping gets its own range of a *second* IOVA domain, the bounce domain, backed
by a preallocated anonymous mmap (the bounce pool, ``window`` bytes; the pool offset of a slot is
its bounce IOVA, which keeps the guest buffer's offset within its page). The device sees only
the slot (``handle.addr``, ``handle.view``); guest memory is touched only by the copies at the
sync points, like ``drivers/vdpa/vdpa_user/iova_domain.c``:

- map (every direction): guest -> bounce. The kernel's swiotlb copies even for FROM_DEVICE since
  the "info leak" fix: otherwise a device that writes less than the whole buffer would have the
  unmap copy stale pool bytes (another mapping's data) into the guest.
- ``sync_single_for_device`` (TO_DEVICE/BIDIRECTIONAL): guest -> bounce.
- ``sync_single_for_cpu`` and unmap (FROM_DEVICE/BIDIRECTIONAL): bounce -> guest.

Coherent mappings (ATTR_COHERENT: the rings) are mapped directly, as VDUSE never bounces
coherent memory: a used ring bounced with one memcpy would publish used.idx before the entries.

Slot IOVAs come from ``alloc_iova_fast`` (size-aligned, range-cached) below the window's top;
with ``rcache=False`` from ``alloc_iova``/``free_iova`` directly, so that every map and unmap is a
tree write (steady traffic is otherwise served from the caches alone, and an injected
node-allocation failure would never reach the deferred-erase path). A failed allocation (window
full, or an injected node-allocation failure of the domain) is a *transient* mapping error: the
device retries later. Deferred erases of the bounce domain are retried by
:meth:`BounceMapOps.housekeeping` (once per server loop turn) and after a failed allocation.
"""

from __future__ import annotations

import mmap

from harness.dma.errors import DmaFault
from harness.dma.iova import IovaDomain
from harness.dma.iova_faults import NodeAllocHook
from harness.dma.mapops import (
    ATTR_COHERENT,
    Direction,
    DirectMapOps,
    DmaHandle,
    MapCtx,
    failed_handle,
    unregister,
)
from harness.dma.memory import GuestMemory, release

PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT
DEFAULT_WINDOW = 64 << 20
#: swiotlb's limit (IO_TLB_SEGSIZE * IO_TLB_SIZE): longer descriptors are mapped in pieces.
DEFAULT_MAX_MAPPING_SIZE = 256 << 10


class _Slot:
    """A bounced mapping's private state: the writable bounce view and its page count."""

    __slots__ = ("bounce", "npages")

    def __init__(self, bounce: memoryview, npages: int) -> None:
        self.bounce = bounce
        self.npages = npages


class BounceMapOps:
    """Bounce-buffer map ops over GuestMemory (see the module docstring)."""

    def __init__(
        self,
        memory: GuestMemory,
        *,
        window: int = DEFAULT_WINDOW,
        max_mapping_size: int | None = None,
        node_alloc: NodeAllocHook | None = None,
        rcache: bool = True,
    ) -> None:
        if window < 4 * PAGE or window % PAGE:
            raise ValueError(f"bounce window {window:#x} must be a multiple of 4 KiB, >= 16 KiB")
        # Slots are size-aligned, may need a page more than the mapping (in-page offset) and
        # pfn 0 is never used: only a quarter of the window is sure to hold one maximal slot.
        if max_mapping_size is None:
            max_mapping_size = min(DEFAULT_MAX_MAPPING_SIZE, window // 4)
        if max_mapping_size < 1 or max_mapping_size > window // 4:
            raise ValueError(
                f"max_mapping_size {max_mapping_size:#x} > a quarter of the bounce window"
            )
        self.memory = memory
        self.window = window
        self._max = max_mapping_size
        # Bounce IOVA 0 is never handed out (start_pfn 1), so a slot address is never 0.
        self.domain = IovaDomain(PAGE, 1, node_alloc=node_alloc)
        self._limit_pfn = (window >> PAGE_SHIFT) - 1
        # Anonymous mmap: reserved up front, populated by the kernel as slots are first used.
        self._pool = mmap.mmap(-1, window)
        self._poolview = memoryview(self._pool)
        self._coherent = DirectMapOps(memory)
        self.rcache = rcache
        self.live_slots = 0
        self.alloc_failures = 0
        self.bytes_to_device = 0
        self.bytes_to_cpu = 0

    # ---- mapping -----------------------------------------------------------------------------

    def map_page(
        self, iova: int, size: int, direction: Direction, attrs: int = 0,
        ctx: MapCtx | None = None,
    ) -> DmaHandle:  # fmt: skip
        if attrs & ATTR_COHERENT:
            return self._coherent.map_page(iova, size, direction, attrs, ctx)
        if size > self._max:
            fault = DmaFault(iova, size, f"larger than max_mapping_size {self._max:#x}")
            return failed_handle(iova, size, direction, fault, ctx)
        try:
            guest, region = self.memory.translate(
                iova, size, write=direction != Direction.TO_DEVICE
            )
        except DmaFault as bad:
            return failed_handle(iova, size, direction, bad, ctx)
        # The slot keeps the buffer's offset within its page, as VDUSE does: the device sees
        # the same sub-page alignment the guest chose.
        off = iova & (PAGE - 1)
        npages = (off + size + PAGE - 1) >> PAGE_SHIFT or 1
        if self.rcache:
            pfn = self.domain.alloc_iova_fast(npages, self._limit_pfn)
        else:
            entry = self.domain.alloc_iova(npages, self._limit_pfn, True)
            pfn = None if entry is None else entry.pfn_lo
        if pfn is None:
            self.alloc_failures += 1
            # Deferred erases still hold space: give them a chance before the device retries.
            if self.domain.deferred:
                self.domain.process_deferred()
            fault = DmaFault(iova, size, "no bounce IOVA space", transient=True)
            return failed_handle(iova, size, direction, fault, ctx)
        addr = (pfn << PAGE_SHIFT) + off
        bounce = self._poolview[addr : addr + size]
        bounce[:] = guest
        self.bytes_to_device += size
        view = bounce.toreadonly() if direction == Direction.TO_DEVICE else bounce
        h = DmaHandle(
            iova, size, direction, view, addr, None, _Slot(bounce, npages), attrs, ctx, guest,
            region, True,
        )  # fmt: skip
        region.live.add(h)
        self.live_slots += 1
        return h

    def unmap_page(self, handle: DmaHandle, direction: Direction) -> None:
        slot = handle.cookie
        if not isinstance(slot, _Slot):
            self._coherent.unmap_page(handle, direction)
            return
        if handle.unmapped:
            return
        handle.unmapped = True
        guest = handle.guest
        if direction != Direction.TO_DEVICE and not handle.revoked and guest is not None:
            guest[:] = slot.bounce
            self.bytes_to_cpu += handle.size
        unregister(handle)
        release(handle.view)
        release(slot.bounce)
        release(guest)
        self.live_slots -= 1
        if self.rcache:
            self.domain.free_iova_fast(handle.addr >> PAGE_SHIFT, slot.npages)
        else:
            self.domain.free_iova(handle.addr >> PAGE_SHIFT)

    def sync_single_for_cpu(self, handle: DmaHandle, direction: Direction) -> None:
        slot = handle.cookie
        if (
            direction != Direction.TO_DEVICE
            and isinstance(slot, _Slot)
            and not handle.unmapped
            and not handle.revoked
            and handle.guest is not None
        ):
            handle.guest[:] = slot.bounce
            self.bytes_to_cpu += handle.size

    def sync_single_for_device(self, handle: DmaHandle, direction: Direction) -> None:
        slot = handle.cookie
        if (
            direction != Direction.FROM_DEVICE
            and isinstance(slot, _Slot)
            and not handle.unmapped
            and not handle.revoked
            and handle.guest is not None
        ):
            slot.bounce[:] = handle.guest
            self.bytes_to_device += handle.size

    # ---- coherent memory ---------------------------------------------------------------------

    def alloc(self, size: int) -> DmaHandle:
        """Coherent memory in the bounce domain (VDUSE's consistent area): device-private,
        visible at ``addr``; a failed allocation is a transient mapping error."""
        npages = (size + PAGE - 1) >> PAGE_SHIFT or 1
        entry = self.domain.alloc_iova(npages, self._limit_pfn, True)
        if entry is None:
            self.alloc_failures += 1
            fault = DmaFault(-1, size, "no bounce IOVA space", transient=True)
            return failed_handle(-1, size, Direction.BIDIRECTIONAL, fault)
        addr = entry.pfn_lo << PAGE_SHIFT
        view = self._poolview[addr : addr + size]
        view[:] = bytes(size)  # dma_alloc_coherent memory is zeroed
        return DmaHandle(-1, size, Direction.BIDIRECTIONAL, view, addr, None, entry)

    def free(self, handle: DmaHandle) -> None:
        if handle.unmapped or handle.error is not None:
            return
        handle.unmapped = True
        release(handle.view)
        self.domain.free_iova(handle.addr >> PAGE_SHIFT)

    # ---- queries -----------------------------------------------------------------------------

    def need_sync(self, handle: DmaHandle) -> bool:
        return handle.bounced

    def mapping_error(self, handle: DmaHandle) -> bool:
        return handle.error is not None

    def max_mapping_size(self) -> int:
        return self._max

    def contiguous(self, iova: int, size: int) -> int:
        # A bounce slot is copied from one guest region, so split where the guest's would.
        return self.memory.contiguous(iova, size)

    def housekeeping(self) -> int:
        """Retry the bounce domain's deferred erases (call once per server loop turn);
        returns how many completed."""
        if self.domain.deferred:
            return self.domain.process_deferred()
        return 0

    def stats(self) -> dict[str, object]:
        dom = self.domain
        return {
            "mode": "bounce",
            "window": self.window,
            "rcache": self.rcache,
            "live_slots": self.live_slots,
            "allocated_pages": dom.allocated_pfns,
            "alloc_failures": self.alloc_failures,
            "deferred_pending": len(dom.deferred),
            "bytes_to_device": self.bytes_to_device,
            "bytes_to_cpu": self.bytes_to_cpu,
            "domain": dict(dom.stats),
        }

    def close(self) -> None:
        """Release the pool (after every mapping is gone)."""
        release(self._poolview)
        try:  # noqa: SIM105
            self._pool.close()
        except BufferError:  # a slot view is still alive somewhere: let GC unmap it later
            pass
