"""A hostile vfio-user client: named malformed messages and sequences, to prove the server survives.

Each case below misbehaves in one named way on a connection of its own and says what it expects
of the server: its reaction, the connection's state afterwards, whether it counts a failed client
and how many error replies it sends. ``CASES`` lists them all, in a stable order
(harness.testing.hostile_framing's, then this file's); ``case_named`` finds one. Import them
from here, where ``CASES`` is complete. The machinery (``HostileClient``, ``HostileCase``,
``Outcome``, ``run_case``) is harness.testing.hostile_client.

Layout: ``CASES`` (with ``case`` and ``case_named``), the expectations and the cases during attach
and of framing are in harness.testing.hostile_framing; this module adds the DMA_MAP / DMA_UNMAP,
REGION_READ / REGION_WRITE, SET_IRQS and live-DMA cases, so ``CASES`` is complete once it has
been imported.
"""

from __future__ import annotations

import errno
import os

from harness.testing.hostile_client import (
    BAR0_SIZE,
    RAM_IOVA,
    RAM_SIZE,
    TRIGGER_EVENTFD,
    TRIGGER_NONE,
    VIRTIO_NET_IDS,
    After,
    Expect,
    HostileCase,
    HostileClient,
    Outcome,
    Reaction,
    _irq_set,
    _live_driver,
    _send,
    dma_map_msg,
    memfd,
    run_case,
    well_behaved,
)
from harness.testing.hostile_framing import (
    CASES,
    EINVAL_USABLE,
    OK_USABLE,
    case,
    case_named,
)
from harness.testing.vfu_client import (
    CONFIG_REGION_INDEX,
    DMA_READ,
    DMA_UNMAP,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_BOOL,
    MSIX_IRQ_INDEX,
    REGION_ACCESS,
    Command,
)

__all__ = ["CASES", "VIRTIO_NET_IDS", "After", "Expect", "HostileCase", "HostileClient", "Outcome",
           "Reaction", "case_named", "run_case", "well_behaved"]


# -- DMA_MAP / DMA_UNMAP -----------------------------------------------------------------------


@case(OK_USABLE, error_replies=0)
def dma_map_without_fd(c: HostileClient) -> Outcome:
    """A DMA_MAP without an fd (memory the device cannot touch, like a ROM window)."""
    out = _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, RAM_SIZE))
    c.dma_unmap(RAM_IOVA, RAM_SIZE)
    return out


@case(Expect(Reaction.ERROR, errno.ENOSPC, After.USABLE), error_replies=1)
def dma_map_huge_size(c: HostileClient) -> Outcome:
    """A DMA_MAP of 2^62 bytes without an fd."""
    return _send(c, Command.DMA_MAP, dma_map_msg(1 << 40, 1 << 62))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_past_end_of_file(c: HostileClient) -> Outcome:
    """A DMA_MAP of 1 TiB backed by a 1 MiB memfd (touching the rest would be SIGBUS)."""
    with memfd() as fd:
        return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 1 << 40), (fd,))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_wrapping(c: HostileClient) -> Outcome:
    """A DMA_MAP of [2^64 - 4 KiB, 2^64 + 4 KiB): its end wraps past 2^64."""
    return _send(c, Command.DMA_MAP, dma_map_msg((1 << 64) - 0x1000, 0x2000))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_unaligned(c: HostileClient) -> Outcome:
    """A DMA_MAP at IOVA 0x100010 of 0x1000 bytes (not page aligned)."""
    return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA + 0x10, 0x1000))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_size_zero(c: HostileClient) -> Outcome:
    """A DMA_MAP of 0 bytes."""
    return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 0))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_bad_flags(c: HostileClient) -> Outcome:
    """A DMA_MAP with an unknown flag bit."""
    return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 0x1000, flags=DMA_READ | 0x80))


@case(EINVAL_USABLE, error_replies=1)
def dma_map_short_argsz(c: HostileClient) -> Outcome:
    """A DMA_MAP whose argsz is smaller than the structure."""
    return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 0x1000, argsz=8))


@case(Expect(Reaction.ERROR, errno.EACCES, After.USABLE), error_replies=1)
def dma_map_unmappable_fd(c: HostileClient) -> Outcome:
    """A DMA_MAP backed by the read end of a pipe (mmap refuses it)."""
    r, w = os.pipe()
    try:
        return _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, 0x1000), (r,))
    finally:
        os.close(r)
        os.close(w)


@case(EINVAL_USABLE, error_replies=1)
def dma_map_overlapping_live_map(c: HostileClient) -> Outcome:
    """A DMA_MAP overlapping half of a live one."""
    with memfd() as fd:
        c.dma_map(RAM_IOVA, RAM_SIZE, fd=fd)
        out = _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA + RAM_SIZE // 2, RAM_SIZE))
        c.dma_unmap(RAM_IOVA, RAM_SIZE)
        return out


@case(OK_USABLE, error_replies=0)
def dma_map_same_region_twice(c: HostileClient) -> Outcome:
    """The same DMA_MAP twice (the library takes it as the region it has)."""
    with memfd() as fd:
        c.dma_map(RAM_IOVA, RAM_SIZE, fd=fd)
        out = _send(c, Command.DMA_MAP, dma_map_msg(RAM_IOVA, RAM_SIZE), (fd,))
        c.dma_unmap(RAM_IOVA, RAM_SIZE)
        return out


@case(OK_USABLE, error_replies=0)
def dma_unmap_unknown_range(c: HostileClient) -> Outcome:
    """A DMA_UNMAP of a range nothing is mapped in (range semantics: nothing to do)."""
    return _send(c, Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, 0, 0x7000_0000, 0x10000))


@case(EINVAL_USABLE, error_replies=1)
def dma_unmap_splitting_a_region(c: HostileClient) -> Outcome:
    """A DMA_UNMAP of half of a live region."""
    with memfd() as fd:
        c.dma_map(RAM_IOVA, RAM_SIZE, fd=fd)
        out = _send(c, Command.DMA_UNMAP,
                    DMA_UNMAP.pack(DMA_UNMAP.size, 0, RAM_IOVA, RAM_SIZE // 2))
        c.dma_unmap(RAM_IOVA, RAM_SIZE)
        return out


@case(EINVAL_USABLE, error_replies=1)
def dma_unmap_wrapping(c: HostileClient) -> Outcome:
    """A DMA_UNMAP whose range wraps past 2^64."""
    return _send(c, Command.DMA_UNMAP,
                 DMA_UNMAP.pack(DMA_UNMAP.size, 0, (1 << 64) - 0x1000, 0x2000))


# -- REGION_READ / REGION_WRITE ----------------------------------------------------------------


@case(EINVAL_USABLE, error_replies=1)
def region_read_unknown_region(c: HostileClient) -> Outcome:
    """A REGION_READ of region 42."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, 42, 4))


@case(EINVAL_USABLE, error_replies=1)
def region_read_out_of_bounds(c: HostileClient) -> Outcome:
    """A REGION_READ of 4 bytes at BAR0's size - 2."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(BAR0_SIZE - 2, 0, 4))


@case(EINVAL_USABLE, error_replies=1)
def region_read_offset_wraps(c: HostileClient) -> Outcome:
    """A REGION_READ of 8 bytes at offset 2^64 - 4 (offset + count wraps)."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack((1 << 64) - 4, 0, 8))


@case(EINVAL_USABLE, error_replies=1)
def region_read_count_too_large(c: HostileClient) -> Outcome:
    """A REGION_READ of 2 MiB of config space."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, CONFIG_REGION_INDEX, 2 << 20))


@case(EINVAL_USABLE, error_replies=1)
def region_write_count_mismatch(c: HostileClient) -> Outcome:
    """A REGION_WRITE claiming 8 bytes and carrying 2."""
    return _send(c, Command.REGION_WRITE, REGION_ACCESS.pack(0x14, 0, 8) + b"\0\0")


@case(EINVAL_USABLE, error_replies=1)
def region_write_unknown_region(c: HostileClient) -> Outcome:
    """A REGION_WRITE to region 9 (past the last one)."""
    return _send(c, Command.REGION_WRITE, REGION_ACCESS.pack(0, 9, 4) + bytes(4))


@case(OK_USABLE, error_replies=0)
def bar0_access_of_odd_width(c: HostileClient) -> Outcome:
    """A 3-byte BAR0 read inside the common config (the device answers zeros and counts it)."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0x14, 0, 3))


# -- SET_IRQS ----------------------------------------------------------------------------------


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_bad_index(c: HostileClient) -> Outcome:
    """SET_IRQS for IRQ index 9 (there are 5)."""
    return _send(c, Command.DEVICE_SET_IRQS, _irq_set(9, 0, 1, TRIGGER_NONE))


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_start_past_end(c: HostileClient) -> Outcome:
    """SET_IRQS for MSI-X vectors [99, 100)."""
    return _send(c, Command.DEVICE_SET_IRQS, _irq_set(MSIX_IRQ_INDEX, 99, 1, TRIGGER_NONE))


@case(OK_USABLE, error_replies=0)
def set_irqs_count_wraps(c: HostileClient) -> Outcome:
    """SET_IRQS for MSI-X vectors [1, 1 + 0xffffffff): start + count wraps to 0, which the
    library's bound check lets through as an empty range."""
    return _send(c, Command.DEVICE_SET_IRQS,
                 _irq_set(MSIX_IRQ_INDEX, 1, 0xFFFFFFFF, TRIGGER_NONE))


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_more_fds_than_count(c: HostileClient) -> Outcome:
    """SET_IRQS for one MSI-X vector carrying 3 eventfds."""
    fds = [os.eventfd(0) for _ in range(3)]
    try:
        return _send(c, Command.DEVICE_SET_IRQS,
                     _irq_set(MSIX_IRQ_INDEX, 0, 1, TRIGGER_EVENTFD), tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_too_many_fds(c: HostileClient) -> Outcome:
    """SET_IRQS for 200 MSI-X vectors (the device has 3) carrying 200 eventfds."""
    fds = [os.eventfd(0) for _ in range(200)]
    try:
        return _send(c, Command.DEVICE_SET_IRQS,
                     _irq_set(MSIX_IRQ_INDEX, 0, 200, TRIGGER_EVENTFD), tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)


@case(EINVAL_USABLE, error_replies=1)
def set_irqs_bool_data_short(c: HostileClient) -> Outcome:
    """SET_IRQS with DATA_BOOL for 3 vectors carrying 1 byte."""
    return _send(c, Command.DEVICE_SET_IRQS,
                 _irq_set(MSIX_IRQ_INDEX, 0, 3, IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL,
                          b"\x01"))


# -- sequences with live DMA -------------------------------------------------------------------


@case(OK_USABLE, error_replies=0)
def device_reset_mid_dma(c: HostileClient) -> Outcome:
    """Rings and buffers live in mapped memory, a TX frame just kicked: DEVICE_RESET, then the
    memory is unmapped."""
    with memfd() as fd:
        _, mem = _live_driver(c, fd)
        try:
            out = _send(c, Command.DEVICE_RESET)
            c.dma_unmap(RAM_IOVA, RAM_SIZE)
        finally:
            mem.close()
        return out


@case(OK_USABLE, error_replies=0)
def dma_unmap_under_live_rings(c: HostileClient) -> Outcome:
    """Rings live in mapped memory: DMA_UNMAP it, then kick TX (the device must not touch the
    memory that is gone)."""
    with memfd() as fd:
        driver, mem = _live_driver(c, fd)
        try:
            out = _send(c, Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, 0, RAM_IOVA,
                                                            RAM_SIZE))
            driver.queues[1].kick()
        finally:
            mem.close()
        return out
