"""VfuContextSetup: the configuration half of VfuContext (harness.vfu.context).

The calls that describe the device to libvfio-user before realize(): PCI identity and revision,
capabilities (and the config-space region callback that callback caps need), regions, MSI-X,
DMA and reset callbacks, then realize() itself, which keeps the config space every new client
must find; plus what both halves use: the live C context (``_live``), the one place a return
code becomes an exception (``_check``) and the config space view. VfuContext (the context's
life, client connection and callback bodies) is a VfuContextSetup; the state these methods use
is set up by its constructor and declared here so each half can be read on its own.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

from harness.vfu import callbacks, msix
from harness.vfu._vfu import ffi, lib
from harness.vfu.dmaregs import DmaRegistry
from harness.vfu.errors import VfuError, error_from_errno
from harness.vfu.model import DmaRegion, ResetType
from harness.vfu.regions import ReadFn, RegionFns, RegionHandlers, WriteFn

log = logging.getLogger("harness.vfu.context")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class VfuContextSetup:
    """What VfuContext is configured with before realize(), and the helpers both halves use."""

    # Set by VfuContext.__init__.
    _ctx: Any
    _deferred: BaseException | None
    _regions: RegionHandlers
    _dma: DmaRegistry
    _on_reset: Callable[[ResetType], None] | None
    _pristine_config: bytes | None
    _config: memoryview | None
    _config_size: int

    # -- helpers ---------------------------------------------------------------------------

    def _live(self) -> Any:
        if self._ctx is None:
            raise VfuError(errno.EBADF, "vfu context is closed")
        return self._ctx

    def _check(self, rc: int, what: str) -> int:
        """The one place rc -1 + errno becomes an exception (and deferred exceptions resurface)."""
        if rc < 0:
            err = ffi.errno
            self._raise_deferred()
            raise error_from_errno(err, what)
        self._raise_deferred()
        return rc

    def _raise_deferred(self) -> None:
        exc, self._deferred = self._deferred, None
        if exc is not None:
            raise exc

    # -- configuration (before realize) ----------------------------------------------------

    def set_ids(self, vid: int, did: int, ssvid: int, ssid: int) -> None:
        lib.vfu_pci_set_id(self._live(), vid, did, ssvid, ssid)

    def set_class(self, base: int, sub: int, pi: int) -> None:
        lib.vfu_pci_set_class(self._live(), base, sub, pi)

    def set_revision(self, rev: int) -> None:
        # This libvfio-user ignores vfu_pci_init's revision argument; the header byte is ours.
        self.config_space()[lib.PCI_REVISION_ID] = rev

    def add_capability(
        self,
        data: bytes,
        *,
        readonly: bool = True,
        read: ReadFn | None = None,
        write: WriteFn | None = None,
    ) -> int:
        """Append a standard PCI capability (MSI-X, PM, EXP or vendor); returns its offset.

        Vendor caps go after those added earlier (the first at 0x40). `readonly` refuses guest
        writes to the whole cap; otherwise libvfio-user refuses only a vendor cap's first 3 bytes.
        With `read` and `write` (both), every client access to the cap goes to them instead
        (VFU_CAP_FLAG_CALLBACK), with offsets relative to the cap: the device keeps its bytes.
        """
        flags = lib.VFU_CAP_FLAG_READONLY if readonly else 0
        if (read is None) != (write is None):
            raise ValueError("a callback capability needs both read and write")
        if read is not None and write is not None:
            # The library sends such a cap's accesses to the config-space region's callback.
            self._serve_config_space()
            flags = lib.VFU_CAP_FLAG_CALLBACK
        # libvfio-user copies the cap into config space; a private buffer keeps `data` immutable.
        buf = ffi.new("char[]", bytes(data))
        off = self._check(
            lib.vfu_pci_add_capability(self._live(), 0, flags, buf), "vfu_pci_add_capability"
        )
        if read is not None and write is not None:
            self._regions.callback_caps.append((off, len(data), RegionFns(read, write)))
        return off

    def _serve_config_space(self) -> None:
        """Register the config-space region callback (once): header and library-handled caps
        never reach it; callback caps, and config space outside any cap, do."""
        cfg = lib.VFU_PCI_DEV_CFG_REGION_IDX
        if cfg in self._regions.by_index:
            return
        rc = lib.vfu_setup_region(
            self._live(), cfg, self._config_size, callbacks.region_trampoline(cfg),
            lib.VFU_REGION_FLAG_RW, ffi.NULL, 0, -1, 0,
        )  # fmt: skip
        self._check(rc, "vfu_setup_region(config space)")
        regions = self._regions
        regions.by_index[cfg] = RegionFns(regions.config_outside_read, regions.config_outside_write)

    def setup_region(self, index: int, size: int, read: ReadFn, write: WriteFn) -> None:
        """Serve region `index` (BAR0..5 = 0..5: memory BARs) through Python callbacks.

        read(offset, count) must return exactly count bytes. write(offset, data) gets a
        read-only view of the client's message, valid only during the call: copy what you keep.
        Regions are trapped (no mmap, no fds): QEMU then keeps posting doorbell writes.
        """
        if not 0 <= index < callbacks.NUM_REGION_TRAMPOLINES:
            raise ValueError(f"region index {index} has no trampoline")
        flags = lib.VFU_REGION_FLAG_RW
        if index < lib.VFU_PCI_DEV_ROM_REGION_IDX:
            # PCI BAR sizing only works for powers of two; newer libvfio-user enforces it.
            if not _is_pow2(size):
                raise ValueError(f"BAR{index} size {size:#x} is not a power of two")
            flags |= lib.VFU_REGION_FLAG_MEM
        rc = lib.vfu_setup_region(
            self._live(), index, size, callbacks.region_trampoline(index), flags,
            ffi.NULL, 0, -1, 0,
        )  # fmt: skip
        self._check(rc, f"vfu_setup_region({index})")
        self._regions.by_index[index] = RegionFns(read, write)

    def setup_msix(
        self,
        nr_vectors: int,
        table_bar: int,
        pba_bar: int,
        *,
        table_offset: int = 0,
        pba_offset: int | None = None,
    ) -> None:
        """Offer nr_vectors MSI-X vectors: the IRQ count and the MSI-X capability, which agree.

        QEMU emulates the table itself but sizes it from the capability and checks it against
        GET_IRQ_INFO. The PBA defaults to 0x800 after the table when both share a BAR (QEMU's
        layout). If the table/PBA BAR has no region yet, a zero-filled one is created.
        Call before add_capability() to put MSI-X first, at 0x40.
        """
        layout = msix.msix_layout(nr_vectors, table_bar, pba_bar, table_offset=table_offset,
                                  pba_offset=pba_offset)
        self._check(
            lib.vfu_setup_device_nr_irqs(self._live(), lib.VFU_DEV_MSIX_IRQ, nr_vectors),
            "vfu_setup_device_nr_irqs(MSIX)",
        )
        # Not read-only: the guest must be able to flip Enable and Function Mask.
        self.add_capability(layout.capability(), readonly=False)
        for bar, end in layout.bar_ends().items():
            if bar not in self._regions.by_index:
                self._setup_msix_bar(bar, end)

    def _setup_msix_bar(self, bar: int, end: int) -> None:
        def read(offset: int, count: int) -> bytes:
            # Reads reaching us are PBA reads (QEMU owns the table): nothing pending here.
            return bytes(count)

        def write(offset: int, data: memoryview) -> None:
            log.debug("ignoring MSI-X BAR%d write at %#x (%d bytes)", bar, offset, len(data))

        self.setup_region(bar, msix.bar_size(end), read, write)

    def setup_dma(
        self, on_map: Callable[[DmaRegion], None], on_unmap: Callable[[DmaRegion], None]
    ) -> None:
        """Get told about guest memory. on_unmap receives the same DmaRegion object on_map got;
        every view derived from region.view must be dropped before on_unmap returns. on_map
        runs once the client has its reply, before the next request is read (run() calls it;
        harness.vfu.dmaregs)."""
        self._check(
            lib.vfu_setup_device_dma(
                self._live(), lib.harness_dma_register_cb, lib.harness_dma_unregister_cb
            ),
            "vfu_setup_device_dma",
        )
        self._dma.on_map, self._dma.on_unmap = on_map, on_unmap

    def setup_reset(self, cb: Callable[[ResetType], None]) -> None:
        self._check(
            lib.vfu_setup_device_reset_cb(self._live(), lib.harness_reset_cb),
            "vfu_setup_device_reset_cb",
        )
        self._on_reset = cb

    def realize(self) -> None:
        self._check(lib.vfu_realize_ctx(self._live()), "vfu_realize_ctx")
        # What every new client must find: the config space as the device defined it.
        self._pristine_config = bytes(self.config_space())

    def config_space(self) -> memoryview:
        """The live PCI config space (4 KiB for express, 256 B otherwise), writable.

        Valid until close(); libvfio-user serves the client's config reads from it.
        """
        ctx = self._live()
        if self._config is None:
            raw = ffi.cast("uint8_t *", lib.vfu_pci_get_config_space(ctx))
            self._config = memoryview(ffi.buffer(raw, self._config_size))
        return self._config
