"""A driver-side mock of Linux virtio-pci + virtio_net over bytearray guest memory, for tests.

``MockDriver`` talks to a device only through ``bar0_read``/``bar0_write`` (the status dance,
feature dwords 0..3, queue setup with lo/hi addresses, doorbells), like the real driver does;
``MockQueue`` writes descriptor tables and avail rings into plain memory and reads the used
ring back, and can also write arbitrary (malformed) descriptors; with VIRTIO_F_RING_PACKED
negotiated ``setup_queue`` builds harness.testing.mockpacked's ``MockPackedQueue`` instead.
``FakeBackend`` and ``FakeIrq`` stand in for the TAP and the MSI-X eventfds (``FdBackend``: a
FakeBackend over a real fd, for the C TX and RX bursts).

The stand-ins ``FakeBackend``, ``FdBackend`` and ``FakeIrq`` are in harness.testing.fakeio
(re-exported here); this module keeps the driver side (``MockMemory``, ``MockQueue``,
``MockDriver``) and the rig that wires them to a device (``NetRig``, ``net_rig``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.dma import DirectMapOps, DmaLedger, GuestMemory, build_mapops
from harness.testing.fakeio import FakeBackend, FakeIrq, FdBackend
from harness.virtio import constants as C
from harness.virtio.net import VirtioNetDevice
from harness.virtio.pci import VirtioPciDevice

__all__ = ["Buffer", "FakeBackend", "FakeIrq", "FdBackend", "MockDriver", "MockMemory",
           "MockQueue", "NetRig", "net_rig"]

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")


class MockMemory:
    """Guest RAM: one bytearray registered in a GuestMemory at ``base``, with a bump heap."""

    def __init__(self, size: int = 4 << 20, *, base: int = 0x100000) -> None:
        self.base = base
        self.size = size
        self.buf = bytearray(size)
        self.memory = GuestMemory()
        self.memory.add_region(base, memoryview(self.buf), writable=True)
        self._next = base

    def alloc(self, size: int, align: int = 16) -> int:
        """IOVA of ``size`` fresh zeroed bytes (never freed: tests are short)."""
        start = (self._next + align - 1) & ~(align - 1)
        if start + size > self.base + self.size:
            raise MemoryError("mock guest memory exhausted")
        self._next = start + size
        return start

    def write(self, iova: int, data: bytes) -> None:
        off = iova - self.base
        self.buf[off : off + len(data)] = data

    def read(self, iova: int, n: int) -> bytes:
        off = iova - self.base
        return bytes(self.buf[off : off + n])


@dataclass
class Buffer:
    """One buffer of a posted chain, as the driver remembers it."""

    iova: int
    length: int
    writable: bool


@dataclass
class MockQueue:
    """The driver side of one split virtqueue."""

    driver: MockDriver
    index: int
    size: int
    desc: int
    avail: int
    used: int
    free: list[int] = field(default_factory=list)
    buffers: dict[int, list[Buffer]] = field(default_factory=dict)
    completed: dict[int, list[Buffer]] = field(default_factory=dict)
    avail_idx: int = 0
    last_used: int = 0
    kicked_at: int = 0  # avail_idx at the last kick decision (Linux: old for vring_need_event)

    def __post_init__(self) -> None:
        self.free = list(range(self.size))

    @property
    def mem(self) -> MockMemory:
        return self.driver.mem

    # ---- raw ring access (also for writing malformed rings) ----------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc + 16 * i, _DESC.pack(addr, length, flags, nxt))

    def set_avail_slot(self, slot: int, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (slot % self.size), _U16.pack(head))

    def write_ring(
        self, table: Sequence[tuple[int, int, int, int]], heads: Sequence[int], avail: int
    ) -> None:
        """Write a whole (possibly malformed) ring: descriptors (addr, len, flags, next) from
        index 0, avail slots from 0, then avail.idx."""
        for i, d in enumerate(table):
            self.write_desc(i, *d)
        for slot, head in enumerate(heads):
            self.set_avail_slot(slot, head)
        self.set_avail_idx(avail)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write(self.avail + 2, _U16.pack(self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail, _U16.pack(flags))

    def set_used_event(self, idx: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, _U16.pack(idx & 0xFFFF))

    def used_idx(self) -> int:
        return int(_U16.unpack(self.mem.read(self.used + 2, 2))[0])

    def used_flags(self) -> int:
        return int(_U16.unpack(self.mem.read(self.used, 2))[0])

    def avail_event(self) -> int:
        return int(_U16.unpack(self.mem.read(self.used + 4 + 8 * self.size, 2))[0])

    # ---- posting buffers ---------------------------------------------------------------------

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"queue {self.index}: {n} descriptors wanted, {len(self.free)} free")
        taken = self.free[:n]
        del self.free[:n]
        return taken

    def _buffers(self, out: Sequence[bytes], in_: Sequence[int]) -> list[Buffer]:
        bufs = []
        for data in out:
            iova = self.mem.alloc(len(data))
            self.mem.write(iova, data)
            bufs.append(Buffer(iova, len(data), False))
        for n in in_:
            bufs.append(Buffer(self.mem.alloc(n), n, True))
        return bufs

    def add(
        self, out: Sequence[bytes] = (), in_: Sequence[int] = (), *, publish: bool = True
    ) -> int:
        """Post a chain: device-readable ``out`` buffers, then writable ones of sizes ``in_``."""
        bufs = self._buffers(out, in_)
        ids = self._take(len(bufs))
        for k, (i, b) in enumerate(zip(ids, bufs, strict=True)):
            last = k == len(ids) - 1
            flags = (C.DESC_F_WRITE if b.writable else 0) | (0 if last else C.DESC_F_NEXT)
            self.write_desc(i, b.iova, b.length, flags, 0 if last else ids[k + 1])
        self.buffers[ids[0]] = bufs
        if publish:
            self.publish(ids[0])
        return ids[0]

    def add_indirect(self, out: Sequence[bytes] = (), in_: Sequence[int] = ()) -> int:
        """Post a chain through an indirect descriptor table (one ring descriptor)."""
        bufs = self._buffers(out, in_)
        table = self.mem.alloc(16 * len(bufs))
        for k, b in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (C.DESC_F_WRITE if b.writable else 0) | (0 if last else C.DESC_F_NEXT)
            self.mem.write(
                table + 16 * k, _DESC.pack(b.iova, b.length, flags, 0 if last else k + 1)
            )
        (head,) = self._take(1)
        self.write_desc(head, table, 16 * len(bufs), C.DESC_F_INDIRECT, 0)
        self.buffers[head] = bufs
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.set_avail_slot(self.avail_idx, head)
        self.set_avail_idx(self.avail_idx + 1)

    def kick(self) -> None:
        """Ring the doorbell unconditionally (a 16-bit write of the queue index)."""
        self.kicked_at = self.avail_idx
        self.driver.write(C.NOTIFY_OFFSET + self.index * C.NOTIFY_OFF_MULTIPLIER, 2, self.index)

    def kick_needed(self) -> bool:
        """Linux virtqueue_kick_prepare: does the device want a kick for what we published?"""
        old, new = self.kicked_at, self.avail_idx
        if self.driver.event_idx:
            event = self.avail_event()
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self.used_flags() & C.USED_F_NO_NOTIFY

    def kick_if_needed(self) -> bool:
        needed = self.kick_needed()
        if needed:
            self.kick()
        else:
            self.kicked_at = self.avail_idx
        return needed

    # ---- completions -------------------------------------------------------------------------

    def get_used(self) -> list[tuple[int, int]]:
        """New used entries (id, len) since the last call; their descriptors become free."""
        idx = self.used_idx()
        out = []
        while self.last_used != idx:
            slot = self.last_used % self.size
            head, length = _USED.unpack(self.mem.read(self.used + 4 + 8 * slot, 8))
            out.append((head, length))
            bufs = self.buffers.pop(head, [])
            self.completed[head] = bufs
            self._free_chain(head, len(bufs))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def _free_chain(self, head: int, n: int) -> None:
        i = head
        for _ in range(max(n, 1)):
            _, _, flags, nxt = _DESC.unpack(self.mem.read(self.desc + 16 * i, 16))
            self.free.append(i)
            if flags & C.DESC_F_INDIRECT or not flags & C.DESC_F_NEXT:
                return
            i = nxt

    def written(self, head: int, length: int) -> bytes:
        """The first ``length`` bytes the device wrote into completed ``head``'s buffers."""
        data = bytearray()
        for b in self.completed.get(head, []):
            if b.writable and len(data) < length:
                data += self.mem.read(b.iova, min(b.length, length - len(data)))
        return bytes(data)


class MockDriver:
    """Plays Linux's virtio_pci_modern probe against a VirtioPciDevice's BAR0."""

    def __init__(self, device: VirtioPciDevice, mem: MockMemory | None = None) -> None:
        self.device = device
        self.mem = mem if mem is not None else MockMemory()
        self.queues: list[MockQueue] = []
        self.features = 0
        self.event_idx = False

    def read(self, offset: int, width: int) -> int:
        return int.from_bytes(self.device.bar0_read(offset, width), "little")

    def write(self, offset: int, width: int, value: int) -> None:
        self.device.bar0_write(offset, memoryview(value.to_bytes(width, "little")))

    def status(self) -> int:
        return self.read(C.COMMON_STATUS, 1)

    def reset(self) -> None:
        self.write(C.COMMON_STATUS, 1, 0)
        for _ in range(100):  # Linux polls until the device reads back 0
            if self.status() == 0:
                return
        raise RuntimeError("device did not reset")

    def device_features(self) -> int:
        feats = 0
        for sel in range(4):  # Linux >= 6.17 reads dwords 0..3
            self.write(C.COMMON_DFSELECT, 4, sel)
            feats |= self.read(C.COMMON_DF, 4) << (32 * sel)
        return feats

    def write_features(self, feats: int) -> None:
        for sel in range(4):
            self.write(C.COMMON_GFSELECT, 4, sel)
            self.write(C.COMMON_GF, 4, feats >> (32 * sel) & 0xFFFFFFFF)

    def negotiate(self, wanted: int | None = None) -> bool:
        """Reset, ACK, DRIVER, features, FEATURES_OK; True if the device kept FEATURES_OK."""
        self.reset()
        self.write(C.COMMON_STATUS, 1, C.STATUS_ACKNOWLEDGE)
        self.write(C.COMMON_STATUS, 1, C.STATUS_ACKNOWLEDGE | C.STATUS_DRIVER)
        offered = self.device_features()
        feats = offered if wanted is None else wanted
        self.write_features(feats)
        st = C.STATUS_ACKNOWLEDGE | C.STATUS_DRIVER | C.STATUS_FEATURES_OK
        self.write(C.COMMON_STATUS, 1, st)
        ok = bool(self.status() & C.STATUS_FEATURES_OK)
        if ok:
            self.features = feats
            self.event_idx = bool(feats >> C.F_EVENT_IDX & 1)
        return ok

    def setup_queue(
        self, index: int, size: int | None = None, vector: int | None = None
    ) -> MockQueue:
        self.write(C.COMMON_Q_SELECT, 2, index)
        max_size = self.read(C.COMMON_Q_SIZE, 2)
        if max_size == 0:
            raise RuntimeError(f"queue {index} absent")
        n = max_size if size is None else size
        self.write(C.COMMON_Q_SIZE, 2, n)
        packed = bool(self.features >> C.F_RING_PACKED & 1)
        desc = self.mem.alloc(16 * n, 16)
        # Packed: the driver and device event suppression areas (4 bytes, 4-aligned).
        avail = self.mem.alloc(4 if packed else 6 + 2 * n, 4 if packed else 2)
        used = self.mem.alloc(4 if packed else 6 + 8 * n, 4)
        for off, addr in ((C.COMMON_Q_DESCLO, desc), (C.COMMON_Q_AVAILLO, avail),
                          (C.COMMON_Q_USEDLO, used)):  # fmt: skip
            self.write(off, 4, addr & 0xFFFFFFFF)
            self.write(off + 4, 4, addr >> 32)
        self.write(C.COMMON_Q_MSIX, 2, index + 1 if vector is None else vector)
        self.write(C.COMMON_Q_ENABLE, 2, 1)
        if packed:
            # Imported here: mockpacked builds on MockQueue from this module.
            from harness.testing.mockpacked import MockPackedQueue

            q: MockQueue = MockPackedQueue(self, index, n, desc, avail, used)
        else:
            q = MockQueue(self, index, n, desc, avail, used)
        if index < len(self.queues):
            self.queues[index] = q
        else:
            self.queues.append(q)
        return q

    def reset_queue(self, index: int) -> int:
        """Linux's vp_modern_set_queue_reset: select, write 1 to queue_reset, poll it (and
        queue_enable) until 0; the value read last. Re-enable with ``setup_queue``."""
        self.write(C.COMMON_Q_SELECT, 2, index)
        self.write(C.COMMON_Q_RESET, 2, 1)
        for _ in range(100):
            if not self.read(C.COMMON_Q_RESET, 2) and not self.read(C.COMMON_Q_ENABLE, 2):
                return 0
        return 1

    def init(self, features: int | None = None, *, queue_size: int | None = None) -> int:
        """The whole probe: negotiate, config vector 0, every queue, DRIVER_OK."""
        if not self.negotiate(features):
            raise RuntimeError("device refused features")
        self.write(C.COMMON_MSIX, 2, 0)
        self.queues = []
        for i in range(self.read(C.COMMON_NUMQ, 2)):
            self.setup_queue(i, queue_size)
        st = self.status() | C.STATUS_DRIVER_OK
        self.write(C.COMMON_STATUS, 1, st)
        return self.features


@dataclass
class NetRig:
    """A VirtioNetDevice wired to a MockDriver, FakeBackend and FakeIrq."""

    device: VirtioNetDevice
    driver: MockDriver
    backend: FakeBackend
    irq: FakeIrq
    bus_master: list[bool]
    #: The DMA ledger behind the device's map ops (``net_rig(ledger=True)``), else None.
    ledger: DmaLedger | None = None

    @property
    def rx(self) -> MockQueue:
        return self.driver.queues[0]

    @property
    def tx(self) -> MockQueue:
        return self.driver.queues[1]


def net_rig(
    *,
    features: int | None = None,
    driver_features: int | None = None,
    queue_size: int = 256,
    init: bool = True,
    mem_size: int = 4 << 20,
    ledger: bool = False,
    backend: FakeBackend | None = None,
    bursts: bool = False,
) -> NetRig:
    """Build a net device over mock memory; ``init`` runs the driver's probe to DRIVER_OK.
    ``ledger``: the device maps through a DMA ledger (``NetRig.ledger``), as the server's do.
    ``backend``: default a FakeBackend (no fd: the C bursts cannot run on it). ``bursts``: the
    device gets the C bursts (harness.vfu.bursts), as the server's does."""
    engine = None
    if bursts:
        from harness.vfu.bursts import CBursts  # the extension: only the tests that ask

        engine = CBursts()
    mem = MockMemory(mem_size)
    backend = FakeBackend() if backend is None else backend
    irq = FakeIrq()
    bme = [True]
    led: DmaLedger | None = None
    if ledger:
        ops, led = build_mapops("direct", mem.memory, bus_master=lambda: bme[0])
    else:
        ops = DirectMapOps(mem.memory)
    dev = VirtioNetDevice(
        ops,
        irq,
        backend,
        mac=bytes.fromhex("525400123456"),
        queue_size=queue_size,
        features=features,
        bus_master=lambda: bme[0],
        bursts=engine,
    )
    driver = MockDriver(dev, mem)
    if init:
        driver.init(driver_features)
    return NetRig(dev, driver, backend, irq, bme, led)
