"""VirtioPciDevice: the virtio-pci modern transport (BAR0 registers, caps, status, features).

BAR0 (16 KiB, like QEMU's layout): common cfg 0x0000 (64 bytes), ISR 0x1000, device cfg 0x2000,
notify 0x3000 (one 4-byte doorbell per queue, notify_off_multiplier 4). Doorbells arrive as
posted region writes, so a kick only marks its queue pending; the device does the ring work in
``process()``, batched. Every register access is validated: a bad offset, width or value is
ignored and counted in ``bad_accesses``, never raised. The VIRTIO_PCI_CAP_PCI_CFG cap's window
(``pci_cfg``, harness.virtio.pcicfg) reaches BAR0 through the same two handlers.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from harness.dma import MapOps
from harness.virtio import constants as C
from harness.virtio.chain import Virtqueue
from harness.virtio.misbehave import Misbehave
from harness.virtio.packed import PackedVirtqueue
from harness.virtio.pcicfg import Bar, PciCfgWindow
from harness.virtio.protocols import Barrier, InterruptSink, no_barrier
from harness.virtio.virtqueue import SplitVirtqueue

log = logging.getLogger(__name__)

#: Bad BAR accesses logged one by one before the log thins out to every 1000th.
BAD_ACCESS_LOG_FIRST = 20

# ACCESS_PLATFORM changes nothing on our side (every access already goes through MapOps);
# it tells the guest to use its DMA API, so a vIOMMU translates what we are given.
TRANSPORT_FEATURES = (
    (1 << C.F_VERSION_1)
    | (1 << C.F_EVENT_IDX)
    | (1 << C.F_INDIRECT_DESC)
    | (1 << C.F_ACCESS_PLATFORM)
)
_MASK32 = 0xFFFFFFFF


def vendor_cap(cfg_type: C.CapType, offset: int, length: int, extra: bytes = b"") -> bytes:
    """A struct virtio_pci_cap for BAR0 as bytes for add_capability (cap_len in byte 2)."""
    cap_len = 16 + len(extra)
    head = struct.pack("<BBBBBBxxII", C.PCI_CAP_ID_VNDR, 0, cap_len, cfg_type, 0, 0, offset, length)
    return head + extra


class VirtioPciDevice:
    """Transport state shared by all virtio devices; subclasses supply config and ring work.

    Subclass hooks: ``_device_config()`` (the device config bytes), ``_on_driver_ok()``,
    ``_on_reset()``. ``_pending`` is a bitmask of kicked queues for the subclass's process().
    """

    bar0_size: int = C.BAR0_SIZE

    def __init__(
        self,
        mapops: MapOps,
        irq: InterruptSink,
        *,
        queue_names: list[str],
        queue_size: int,
        device_features: int,
        device_config_len: int,
        bus_master: Callable[[], bool],
        barrier: Barrier = no_barrier,
    ) -> None:
        if queue_size <= 0 or queue_size & (queue_size - 1) or queue_size > C.MAX_QUEUE_SIZE:
            raise ValueError(f"queue_size {queue_size} is not a power of two <= 32768")
        if not device_features >> C.F_VERSION_1 & 1:
            raise ValueError("a modern-only device must offer VIRTIO_F_VERSION_1")
        self.mapops = mapops
        self.irq = irq
        self.device_features = device_features
        self.bus_master = bus_master
        self._barrier = barrier
        self.queues: list[Virtqueue] = [
            SplitVirtqueue(i, queue_size, mapops, name=n, on_error=self._queue_error,
                           barrier=barrier)
            for i, n in enumerate(queue_names)
        ]  # fmt: skip
        self.num_queues = len(self.queues)
        self.msix_vectors = self.num_queues + 1
        self.notify_len = self.num_queues * C.NOTIFY_OFF_MULTIPLIER
        self.device_config_len = device_config_len
        self.caps: list[bytes] = [
            vendor_cap(C.CapType.COMMON, C.COMMON_OFFSET, C.COMMON_CFG_LEN),
            vendor_cap(C.CapType.NOTIFY, C.NOTIFY_OFFSET, self.notify_len,
                       struct.pack("<I", C.NOTIFY_OFF_MULTIPLIER)),
            vendor_cap(C.CapType.ISR, C.ISR_OFFSET, C.ISR_LEN),
            vendor_cap(C.CapType.DEVICE, C.DEVICE_OFFSET, device_config_len),
            # Last: the config-space access window (4.1.4.9), bar/offset/length set by the
            # driver; the server backs it with ``pci_cfg`` (harness.virtio.pcicfg).
            vendor_cap(C.CapType.PCI_CFG, 0, 0, bytes(4)),
        ]  # fmt: skip
        #: The pci_cfg_data window: reaches BAR0 through bar0_read/bar0_write.
        self.pci_cfg = PciCfgWindow(self.caps[-1],
                                    {0: Bar(self.bar0_read, self.bar0_write, self.bar0_size)})
        self.bad_accesses = 0
        self.resets = 0
        self.queue_resets = 0  # per-queue resets through queue_reset (VIRTIO_F_RING_RESET)
        #: Called at the end of every reset (the server checks the ledger for leaks there).
        self.after_reset: Callable[[], None] = lambda: None
        self.device_errors = 0
        self.config_generation = 0
        self._pending = 0
        #: Active misbehaviours (harness.virtio.misbehave), None when the device behaves.
        self.misbehave: Misbehave | None = None
        self._reset_transport()

    # ---- state -------------------------------------------------------------------------------

    def _reset_transport(self) -> None:
        self.status = 0
        self.driver_features = 0
        self._features_bad = False  # the driver wrote a bit in a dword we cannot represent
        self.negotiated = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.msix_config = C.NO_VECTOR
        self.isr = 0
        self._pending = 0
        for q in self.queues:
            q.reset()

    def reset(self) -> None:
        """Device reset (status 0, FLR, lost connection): back to the power-on state."""
        self.resets += 1
        self._reset_transport()
        self._on_reset()
        self.after_reset()

    def has_feature(self, bit: int) -> bool:
        """Whether ``bit`` was negotiated (valid once FEATURES_OK is accepted)."""
        return bool(self.negotiated >> bit & 1)

    @property
    def driver_ok(self) -> bool:
        """DRIVER_OK set and NEEDS_RESET not: the device may use its queues."""
        return self.status & (C.STATUS_DRIVER_OK | C.STATUS_NEEDS_RESET) == C.STATUS_DRIVER_OK

    def dma_unmapped(self, iova: int, size: int) -> None:
        """Guest memory [iova, iova+size) is about to disappear: drop ring views inside it.

        Call before the views die (the vfu DMA unregister callback). Rings are remapped on
        next use, so a region that is replaced (unmap + map) is harmless.
        """
        for q in self.queues:
            if q.overlaps(iova, size):
                q.drop_rings()

    def memory_changed(self) -> None:
        """Guest memory lost regions (range unknown): drop every ring view, remap on next use.

        Remapping is three map_page calls per queue, so being coarse here costs little.
        """
        for q in self.queues:
            q.drop_rings()

    # ---- hooks -------------------------------------------------------------------------------

    def _device_config(self) -> bytes:
        return bytes(self.device_config_len)

    def _on_driver_ok(self) -> None:
        pass

    def _on_reset(self) -> None:
        pass

    def _on_queue_reset(self, q: Virtqueue) -> None:
        pass

    # ---- interrupts and errors ---------------------------------------------------------------

    def _queue_interrupt(self, q: Virtqueue) -> None:
        self.isr |= C.ISR_QUEUE
        vector = q.msix_vector
        if self.misbehave is not None:  # lost, wrong vector or late
            vector = self.misbehave.on_interrupt(q.name, vector,
                                                 [x.msix_vector for x in self.queues])
        if vector not in (C.NO_VECTOR, -1):
            q.stats.interrupts += 1
            self.irq.trigger(vector)

    def config_changed(self) -> None:
        """Bump config_generation and raise the config interrupt."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.isr |= C.ISR_CONFIG
        if self.msix_config != C.NO_VECTOR:
            self.irq.trigger(self.msix_config)

    def device_error(self, reason: str) -> None:
        """The device cannot continue: set NEEDS_RESET and tell the driver (once)."""
        self.device_errors += 1
        if self.status & C.STATUS_NEEDS_RESET:
            return
        log.error("device needs reset: %s", reason)
        self.status |= C.STATUS_NEEDS_RESET
        self.config_changed()

    def _queue_error(self, q: Virtqueue, reason: str) -> None:
        self.device_error(f"queue {q.name}: {reason}")

    def _bad(self, what: str, offset: int, count: int) -> None:
        self.bad_accesses += 1
        n = self.bad_accesses
        # A hostile driver can make millions of these (a fuzz run makes ~3 per iteration): the
        # counter has them all, the log the first few and then every 1000th, so it stays small.
        if n <= BAD_ACCESS_LOG_FIRST or n % 1000 == 0:
            log.warning("bad BAR0 %s at %#x size %d (%d so far%s)", what, offset, count, n,
                        "; from now on every 1000th is logged" if n == BAD_ACCESS_LOG_FIRST
                        else "")

    # ---- BAR0 --------------------------------------------------------------------------------

    def bar0_read(self, offset: int, count: int) -> bytes:
        """A BAR0 read of ``count`` bytes; invalid accesses read as zeros."""
        if count <= 0 or count > 8 or offset < 0:
            self._bad("read", offset, count)
            return bytes(max(count, 0))
        if offset < C.COMMON_CFG_LEN:
            if C.COMMON_FIELD_WIDTH.get(offset) != count:
                self._bad("common read", offset, count)
                return bytes(count)
            return self._common_read(offset).to_bytes(count, "little")
        if offset >= C.ISR_OFFSET and offset + count <= C.ISR_OFFSET + C.ISR_LEN:
            value = self.isr if offset == C.ISR_OFFSET else 0
            if offset == C.ISR_OFFSET:
                self.isr = 0  # read-to-clear (spec 4.1.4.5)
            return value.to_bytes(count, "little")
        rel = offset - C.DEVICE_OFFSET
        if rel >= 0 and rel + count <= self.device_config_len and count in (1, 2, 4, 8):
            return self._device_config()[rel : rel + count]
        self._bad("read", offset, count)
        return bytes(count)

    def bar0_write(self, offset: int, data: memoryview) -> None:
        """A BAR0 write (doorbells included); invalid accesses are ignored and counted."""
        count = len(data)
        rel = offset - C.NOTIFY_OFFSET
        if 0 <= rel < self.notify_len:
            # The doorbell's address names the queue; the value written is not needed.
            if count in (2, 4) and rel % C.NOTIFY_OFF_MULTIPLIER == 0:
                q = rel // C.NOTIFY_OFF_MULTIPLIER
                self.queues[q].stats.kicks += 1
                self._pending |= 1 << q
                return
            self._bad("notify write", offset, count)
            return
        if 0 <= offset < C.COMMON_CFG_LEN and C.COMMON_FIELD_WIDTH.get(offset) == count:
            self._common_write(offset, int.from_bytes(data, "little"))
            return
        self._bad("write", offset, count)

    # ---- common configuration ----------------------------------------------------------------

    def _selected(self) -> Virtqueue | None:
        sel = self.queue_select
        return self.queues[sel] if sel < self.num_queues else None

    def _common_read(self, off: int) -> int:
        if off == C.COMMON_DFSELECT:
            return self.device_feature_select
        if off == C.COMMON_DF:
            sel = self.device_feature_select
            feats = self.device_features
            if self.misbehave is not None:  # forbidden-feature-combo
                feats = self.device_features = self.misbehave.on_features(feats)
            return feats >> (32 * sel) & _MASK32 if sel < 2 else 0
        if off == C.COMMON_GFSELECT:
            return self.driver_feature_select
        if off == C.COMMON_GF:
            sel = self.driver_feature_select
            return self.driver_features >> (32 * sel) & _MASK32 if sel < 2 else 0
        if off == C.COMMON_MSIX:
            return self.msix_config
        if off == C.COMMON_NUMQ:
            return self.num_queues
        if off == C.COMMON_STATUS:
            if self.misbehave is not None:  # reset-never-completes
                return self.misbehave.on_status_read(self.status)
            return self.status
        if off == C.COMMON_CFGGENERATION:
            return self.config_generation
        if off == C.COMMON_Q_SELECT:
            return self.queue_select
        q = self._selected()
        if q is None:
            return 0  # absent queue: size 0 tells the driver so
        if off == C.COMMON_Q_SIZE:
            return q.size
        if off == C.COMMON_Q_MSIX:
            return q.msix_vector
        if off == C.COMMON_Q_ENABLE:
            return int(q.enabled)
        if off == C.COMMON_Q_NOFF:
            return q.index
        if off == C.COMMON_Q_DESCLO:
            return q.desc_addr & _MASK32
        if off == C.COMMON_Q_DESCHI:
            return q.desc_addr >> 32
        if off == C.COMMON_Q_AVAILLO:
            return q.avail_addr & _MASK32
        if off == C.COMMON_Q_AVAILHI:
            return q.avail_addr >> 32
        if off == C.COMMON_Q_USEDLO:
            return q.used_addr & _MASK32
        if off == C.COMMON_Q_USEDHI:
            return q.used_addr >> 32
        # queue_reset reads 1 only while a reset is under way (4.1.4.3.1); ours completes
        # inside the write, so it always reads 0 and the driver's poll loop ends at once.
        # queue_notify_data, admin queue: features we do not offer.
        return 0

    def _vector_ok(self, v: int) -> int:
        # An unusable vector reads back as NO_VECTOR, which is how the driver learns of it.
        return v if v < self.msix_vectors else C.NO_VECTOR

    def _common_write(self, off: int, v: int) -> None:
        if off == C.COMMON_DFSELECT:
            self.device_feature_select = v
        elif off == C.COMMON_GFSELECT:
            self.driver_feature_select = v
        elif off == C.COMMON_GF:
            self._write_driver_features(v)
        elif off == C.COMMON_MSIX:
            self.msix_config = self._vector_ok(v)
        elif off == C.COMMON_STATUS:
            self._write_status(v)
        elif off == C.COMMON_Q_SELECT:
            self.queue_select = v
        elif off == C.COMMON_Q_RESET:
            self._queue_reset(v)
        elif C.COMMON_Q_SIZE <= off <= C.COMMON_Q_USEDHI and off != C.COMMON_Q_NOFF:
            self._queue_write(off, v)
        else:
            self._bad("write to read-only field", off, C.COMMON_FIELD_WIDTH[off])

    def _write_driver_features(self, v: int) -> None:
        if self.status & C.STATUS_FEATURES_OK:
            self._bad("driver_feature write after FEATURES_OK", C.COMMON_GF, 4)
            return
        sel = self.driver_feature_select
        if sel >= 2:
            # Linux >= 6.17 writes dwords 2 and 3; we offer nothing there, so only a set bit
            # matters (and makes FEATURES_OK fail). Never shift by a guest-chosen amount.
            if v:
                self._features_bad = True
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(_MASK32 << shift)) | (v << shift)

    def _write_status(self, v: int) -> None:
        if self.misbehave is not None:  # FEATURES_OK refused, NEEDS_RESET in probe, stuck reset
            v = self.misbehave.on_status_write(self.status, v)
        if v == 0:
            self.reset()
            return
        old = self.status
        if old & ~v & ~C.STATUS_NEEDS_RESET & 0xFF:
            self._bad("status write clearing bits", C.COMMON_STATUS, 1)
        if v & C.STATUS_FEATURES_OK and not old & C.STATUS_FEATURES_OK:
            unoffered = self.driver_features & ~self.device_features
            if unoffered or self._features_bad or not self.driver_features >> C.F_VERSION_1 & 1:
                log.warning("refusing driver features %#x (offered %#x)",
                            self.driver_features, self.device_features)  # fmt: skip
                v &= ~C.STATUS_FEATURES_OK
            else:
                self.negotiated = self.driver_features
                self._select_ring_format()
        if v & C.STATUS_DRIVER_OK and not v & C.STATUS_FEATURES_OK:
            self._bad("DRIVER_OK without FEATURES_OK", C.COMMON_STATUS, 1)
            v &= ~C.STATUS_DRIVER_OK
        # NEEDS_RESET belongs to the device: only a reset clears it.
        self.status = v | (old & C.STATUS_NEEDS_RESET)
        if v & C.STATUS_DRIVER_OK and not old & C.STATUS_DRIVER_OK:
            # Buffers posted and kicked before DRIVER_OK have to be looked at now.
            self._pending = (1 << self.num_queues) - 1
            self._on_driver_ok()

    def _select_ring_format(self) -> None:
        """Every queue in the negotiated format (VIRTIO_F_RING_PACKED: packed, else split),
        chosen at FEATURES_OK, before the driver may set a queue up (3.1.1); counters and
        misbehaviours carry over, and the format stays until the next FEATURES_OK."""
        cls = PackedVirtqueue if self.has_feature(C.F_RING_PACKED) else SplitVirtqueue
        for i, q in enumerate(self.queues):
            if type(q) is cls:
                continue
            new = cls(q.index, q.max_size, self.mapops, name=q.name, on_error=self._queue_error,
                      barrier=self._barrier)  # fmt: skip
            new.stats, new.misbehave = q.stats, q.misbehave
            new.size, new.msix_vector = q.size, q.msix_vector
            new.desc_addr, new.avail_addr, new.used_addr = q.desc_addr, q.avail_addr, q.used_addr
            q.reset()  # nothing is mapped before FEATURES_OK, but never leak a mapping
            self.queues[i] = new

    def _queue_reset(self, v: int) -> None:
        """queue_reset write (VIRTIO_F_RING_RESET, 2.6.1): 1 resets the selected queue alone.

        Everything the queue holds is unmapped and forgotten (addresses, indices, vector, size
        back to the maximum, not enabled), its pending kick dropped; the other queues and the
        device status are untouched. The driver may then reprogram and re-enable it. Anything
        else (feature not negotiated, no such queue, a queue not enabled, a value other than
        1) is ignored and counted like every bad register access.
        """
        q = self._selected()
        if not self.has_feature(C.F_RING_RESET):
            self._bad("queue_reset write without VIRTIO_F_RING_RESET", C.COMMON_Q_RESET, 2)
        elif q is None:
            self._bad(f"queue_reset of absent queue {self.queue_select}", C.COMMON_Q_RESET, 2)
        elif v != 1:
            self._bad(f"queue_reset={v} (only 1 resets)", C.COMMON_Q_RESET, 2)
        elif not q.enabled:
            self._bad(f"queue_reset of queue {q.index}, which is not enabled",
                      C.COMMON_Q_RESET, 2)
        else:
            log.info("queue %d (%s) reset by the driver", q.index, q.name)
            self.queue_resets += 1
            q.reset()
            self._pending &= ~(1 << q.index)
            if self.misbehave is not None:  # used-out-of-order: drop a frame held for it
                self.misbehave.on_queue_reset(q.name)
            self._on_queue_reset(q)

    def _queue_write(self, off: int, v: int) -> None:
        q = self._selected()
        if q is None:
            self._bad(f"queue register write, queue {self.queue_select} absent", off, 2)
            return
        if off == C.COMMON_Q_MSIX:
            q.msix_vector = self._vector_ok(v)
            return
        if q.enabled:
            self._bad(f"queue {q.index} register write while enabled", off, 2)
            return
        if off == C.COMMON_Q_SIZE:
            # Packed rings take any size up to the maximum (2.8.10.1), split ones a power of 2.
            pow2 = not isinstance(q, PackedVirtqueue)
            if v == 0 or (pow2 and v & (v - 1)) or v > q.max_size:
                self._bad(f"queue {q.index} size {v}", off, 2)
                return
            q.size = v
        elif off == C.COMMON_Q_ENABLE:
            if v != 1 or not self.status & C.STATUS_FEATURES_OK:
                self._bad(f"queue {q.index} enable={v}", off, 2)
                return
            q.enable(event_idx=self.has_feature(C.F_EVENT_IDX),
                     indirect=self.has_feature(C.F_INDIRECT_DESC))  # fmt: skip
        else:
            lo = off in (C.COMMON_Q_DESCLO, C.COMMON_Q_AVAILLO, C.COMMON_Q_USEDLO)
            attr = {
                C.COMMON_Q_DESCLO: "desc_addr", C.COMMON_Q_DESCHI: "desc_addr",
                C.COMMON_Q_AVAILLO: "avail_addr", C.COMMON_Q_AVAILHI: "avail_addr",
                C.COMMON_Q_USEDLO: "used_addr", C.COMMON_Q_USEDHI: "used_addr",
            }[off]  # fmt: skip
            cur: int = getattr(q, attr)
            new = (cur & ~_MASK32) | v if lo else (cur & _MASK32) | (v << 32)
            setattr(q, attr, new)
