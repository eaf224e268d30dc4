"""Type stub for the cffi extension built by harness.vfu.build (see its cdef for the C side)."""

from typing import Any

# cdata objects are opaque to mypy.
CData = Any

class _FFI:
    NULL: CData
    errno: int
    def new(self, cdecl: str, init: Any = ...) -> CData: ...
    def new_handle(self, obj: object) -> CData: ...
    def from_handle(self, handle: CData) -> Any: ...
    def buffer(self, cdata: CData, size: int = ...) -> Any: ...
    def from_buffer(self, python_buffer: Any, require_writable: bool = ...) -> CData: ...
    def release(self, cdata: CData) -> None: ...
    def cast(self, cdecl: str, value: Any) -> CData: ...
    def string(self, cdata: CData, maxlen: int = ...) -> bytes: ...
    def memmove(self, dest: Any, src: Any, n: int) -> None: ...
    def sizeof(self, cdecl: Any) -> int: ...
    def offsetof(self, cdecl: str, *fields: str) -> int: ...
    def def_extern(self, name: str = ..., onerror: Any = ...) -> Any: ...

class _Lib:
    LIB_VFIO_USER_MAJOR: int
    LIB_VFIO_USER_MINOR: int
    LIBVFIO_USER_FLAG_ATTACH_NB: int
    VFU_REGION_FLAG_READ: int
    VFU_REGION_FLAG_WRITE: int
    VFU_REGION_FLAG_RW: int
    VFU_REGION_FLAG_MEM: int
    VFU_CAP_FLAG_EXTENDED: int
    VFU_CAP_FLAG_CALLBACK: int
    VFU_CAP_FLAG_READONLY: int
    VFU_PCI_DEV_BAR0_REGION_IDX: int
    VFU_PCI_DEV_ROM_REGION_IDX: int
    VFU_PCI_DEV_CFG_REGION_IDX: int
    PCI_HEADER_TYPE_NORMAL: int
    PCI_CFG_SPACE_SIZE: int
    PCI_CFG_SPACE_EXP_SIZE: int
    PCI_CAP_ID_MSIX: int
    PCI_CAP_MSIX_SIZEOF: int
    PCI_MSIX_FLAGS_QSIZE: int
    PCI_REVISION_ID: int
    PROT_READ: int
    VFIO_USER_VERSION: int
    VFIO_USER_DMA_MAP: int
    VFIO_USER_DMA_UNMAP: int
    VFIO_USER_DEVICE_GET_INFO: int
    VFIO_USER_DEVICE_GET_REGION_INFO: int
    VFIO_USER_DEVICE_GET_REGION_IO_FDS: int
    VFIO_USER_DEVICE_GET_IRQ_INFO: int
    VFIO_USER_DEVICE_SET_IRQS: int
    VFIO_USER_REGION_READ: int
    VFIO_USER_REGION_WRITE: int
    VFIO_USER_DMA_READ: int
    VFIO_USER_DMA_WRITE: int
    VFIO_USER_DEVICE_RESET: int
    VFIO_USER_DIRTY_PAGES: int
    HARNESS_NR_COMMANDS: int
    HARNESS_DMA_GRANULE: int
    PROT_WRITE: int
    LOG_ERR: int
    LOG_WARNING: int
    LOG_NOTICE: int
    LOG_INFO: int
    LOG_DEBUG: int
    VFU_TRANS_SOCK: int
    VFU_DEV_TYPE_PCI: int
    VFU_PCI_TYPE_CONVENTIONAL: int
    VFU_PCI_TYPE_EXPRESS: int
    VFU_RESET_DEVICE: int
    VFU_RESET_LOST_CONN: int
    VFU_RESET_PCI_FLR: int
    VFU_DEV_INTX_IRQ: int
    VFU_DEV_MSI_IRQ: int
    VFU_DEV_MSIX_IRQ: int
    def vfu_create_ctx(
        self, trans: int, path: bytes, flags: int, pvt: CData, dev_type: int
    ) -> CData: ...
    def vfu_realize_ctx(self, ctx: CData) -> int: ...
    def vfu_attach_ctx(self, ctx: CData) -> int: ...
    def vfu_get_poll_fd(self, ctx: CData) -> int: ...
    def vfu_run_ctx(self, ctx: CData) -> int: ...
    def vfu_destroy_ctx(self, ctx: CData) -> None: ...
    def vfu_get_private(self, ctx: CData) -> CData: ...
    def vfu_setup_log(self, ctx: CData, log: CData, level: int) -> int: ...
    def vfu_setup_region(
        self,
        ctx: CData,
        region_idx: int,
        size: int,
        region_access: CData,
        flags: int,
        mmap_areas: CData,
        nr_mmap_areas: int,
        fd: int,
        offset: int,
    ) -> int: ...
    def vfu_setup_device_reset_cb(self, ctx: CData, reset: CData) -> int: ...
    def vfu_setup_device_dma(
        self, ctx: CData, dma_register: CData, dma_unregister: CData
    ) -> int: ...
    def vfu_setup_device_nr_irqs(self, ctx: CData, type: int, count: int) -> int: ...
    def vfu_irq_trigger(self, ctx: CData, subindex: int) -> int: ...
    def vfu_pci_init(self, ctx: CData, pci_type: int, hdr_type: int, revision: int) -> int: ...
    def vfu_pci_set_id(self, ctx: CData, vid: int, did: int, ssvid: int, ssid: int) -> None: ...
    def vfu_pci_set_class(self, ctx: CData, base: int, sub: int, pi: int) -> None: ...
    def vfu_pci_get_config_space(self, ctx: CData) -> CData: ...
    def vfu_pci_add_capability(self, ctx: CData, pos: int, flags: int, data: CData) -> int: ...
    def harness_mb(self) -> None: ...
    def harness_set_client_timeout(self, ms: int) -> None: ...
    def harness_wire_take(self, out: CData) -> None: ...
    def harness_close_duplicate_map_fd(self) -> None: ...
    def harness_map_cache_enable(self, on: int) -> None: ...
    def harness_map_cache_stats(self, out: CData) -> None: ...
    def harness_tx_burst(self, q: CData, budget: int) -> int: ...
    def harness_rx_burst(self, q: CData, budget: int) -> int: ...
    # extern "Python" trampolines, as C function pointers.
    harness_log_cb: CData
    harness_reset_cb: CData
    harness_dma_register_cb: CData
    harness_dma_unregister_cb: CData
    harness_region_cb0: CData
    harness_region_cb1: CData
    harness_region_cb2: CData
    harness_region_cb3: CData
    harness_region_cb4: CData
    harness_region_cb5: CData
    harness_region_cb6: CData
    harness_region_cb7: CData

ffi: _FFI
lib: _Lib
