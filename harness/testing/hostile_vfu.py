"""A hostile vfio-user client: named malformed messages and sequences, to prove the server survives.

Each case below misbehaves in one named way on a connection of its own and says what it expects
of the server: its reaction, the connection's state afterwards, whether it counts a failed client
and how many error replies it sends. ``CASES`` lists them all, in a stable order (this file's);
``case_named`` finds one. Import them from here, where ``CASES`` is complete. The machinery
(``HostileClient``, ``HostileCase``, ``Outcome``, ``run_case``) is harness.testing.hostile_client.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket

from harness.testing.hostile_client import (
    BAR0_SIZE,
    RAM_IOVA,
    RAM_SIZE,
    SERVER_MAX_MSG_SIZE,
    TRIGGER_EVENTFD,
    TRIGGER_NONE,
    VIRTIO_NET_IDS,
    After,
    CaseList,
    Expect,
    HostileCase,
    HostileClient,
    Outcome,
    Reaction,
    _irq_set,
    _live_driver,
    _send,
    _version,
    dma_map_msg,
    memfd,
    run_case,
    well_behaved,
)
from harness.testing.vfu_client import (
    CONFIG_REGION_INDEX,
    DEVICE_INFO,
    DMA_MAP,
    DMA_READ,
    DMA_UNMAP,
    FLAG_TYPE_REPLY,
    HEADER,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_BOOL,
    MSIX_IRQ_INDEX,
    PROTOCOL_MINOR,
    REGION_ACCESS,
    VERSION,
    Command,
    ServerClosed,
)

__all__ = ["CASES", "VIRTIO_NET_IDS", "After", "Expect", "HostileCase", "HostileClient", "Outcome",
           "Reaction", "case_named", "run_case", "well_behaved"]

#: Every case below, in the order they are defined (complete once this module has run).
CASES = CaseList()
case = CASES.case
case_named = CASES.named


ERROR_CLOSED = Expect(Reaction.ERROR, errno.EINVAL, After.CLOSED)
EINVAL_USABLE = Expect(Reaction.ERROR, errno.EINVAL, After.USABLE)
OK_USABLE = Expect(Reaction.OK, 0, After.USABLE)
DISCONNECT = Expect(Reaction.DISCONNECT, 0, After.CLOSED)
HUNG_UP = Expect(Reaction.HUNG_UP, 0, After.HUNG_UP)


# -- during attach (the first message must be a good VERSION) ----------------------------------


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False)
def garbage_instead_of_version(c: HostileClient) -> Outcome:
    """24 bytes of text where VERSION belongs (its "header" claims a reply flag)."""
    c.send(0, raw=b"garbage garbage garbage!")
    return c.disconnected()


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False)
def truncated_header_at_attach(c: HostileClient) -> Outcome:
    """Half a header (8 of 16 bytes), then silence."""
    c.send(0, raw=HEADER.pack(0, Command.VERSION, 64, 0, 0)[:8])
    return c.disconnected()


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def command_before_version(c: HostileClient) -> Outcome:
    """DEVICE_GET_INFO as the first message."""
    msg_id = c.send(Command.DEVICE_GET_INFO, bytes(16))
    return c.outcome_of(msg_id, Command.DEVICE_GET_INFO, attach=True)


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_bad_major(c: HostileClient) -> Outcome:
    """VERSION 1.0 (the server speaks 0.x)."""
    return _version(c, VERSION.pack(1, 0) + b"{}\0")


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_invalid_json(c: HostileClient) -> Outcome:
    """VERSION whose capabilities are not JSON."""
    return _version(c, VERSION.pack(0, PROTOCOL_MINOR) + b"{capabilities: [1, 2\0")


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_json_without_nul(c: HostileClient) -> Outcome:
    """VERSION whose JSON is not NUL-terminated (the server would read past it)."""
    return _version(c, VERSION.pack(0, PROTOCOL_MINOR) + b'{"capabilities": {}}')


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_huge_json(c: HostileClient) -> Outcome:
    """VERSION with 1 MiB of JSON nested 512 Ki levels deep (as large as a message may be)."""
    depth = (SERVER_MAX_MSG_SIZE - HEADER.size - VERSION.size - 1) // 2
    return _version(c, VERSION.pack(0, PROTOCOL_MINOR) + b"[" * depth + b"]" * depth + b"\0")


@case(ERROR_CLOSED, client_failure=True, error_replies=1, negotiate=False)
def version_bad_capabilities(c: HostileClient) -> Outcome:
    """VERSION asking for 100000 fds per message (the server allows 1024)."""
    caps = json.dumps({"capabilities": {"max_msg_fds": 100000}}).encode()
    return _version(c, VERSION.pack(0, PROTOCOL_MINOR) + caps + b"\0")


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False)
def version_oversized(c: HostileClient) -> Outcome:
    """VERSION whose header claims 2 MiB (more than any message may be), body following."""
    payload = VERSION.pack(0, PROTOCOL_MINOR) + b" " * 4096
    with contextlib.suppress(ServerClosed):
        c.send(Command.VERSION, payload, size=2 << 20)
    return c.disconnected()


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False)
def version_size_ffffffff(c: HostileClient) -> Outcome:
    """VERSION whose header claims 0xffffffff bytes."""
    c.send(Command.VERSION, VERSION.pack(0, PROTOCOL_MINOR), size=0xFFFFFFFF)
    return c.disconnected()


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False, uses_timeout=True)
def version_never_sent(c: HostileClient) -> Outcome:
    """Connect and say nothing (the server must not wait for ever)."""
    return c.disconnected()


@case(DISCONNECT, client_failure=True, error_replies=0, negotiate=False, uses_timeout=True)
def version_body_stalls(c: HostileClient) -> Outcome:
    """A VERSION header claiming 100 bytes of body, then 10 bytes and silence."""
    c.send(Command.VERSION, VERSION.pack(0, PROTOCOL_MINOR) + b"{}\0" + bytes(3),
           size=HEADER.size + 100)
    return c.disconnected()


# -- framing, after a good VERSION -------------------------------------------------------------


@case(DISCONNECT, error_replies=0)
def truncated_header(c: HostileClient) -> Outcome:
    """Half a header (8 of 16 bytes), then silence: the server reads it as a lost connection."""
    c.send(0, raw=HEADER.pack(7, Command.DEVICE_GET_INFO, 32, 0, 0)[:8])
    return c.disconnected()


@case(EINVAL_USABLE, error_replies=1)
def size_larger_than_message(c: HostileClient) -> Outcome:
    """A REGION_READ whose header claims 16 more bytes than it carries."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, CONFIG_REGION_INDEX, 4),
                 size=HEADER.size + REGION_ACCESS.size + 16)


@case(EINVAL_USABLE, error_replies=1)
def size_ffffffff(c: HostileClient) -> Outcome:
    """A REGION_READ header claiming 0xffffffff bytes, alone (the server reads no body for a
    size it refuses, so bytes after it would be taken for the next header)."""
    return _send(c, Command.REGION_READ, size=0xFFFFFFFF)


@case(EINVAL_USABLE, error_replies=1)
def size_smaller_than_header(c: HostileClient) -> Outcome:
    """A REGION_READ header claiming 8 bytes, less than itself (alone, as above)."""
    return _send(c, Command.REGION_READ, size=8)


@case(Expect(Reaction.ERROR, errno.EINVAL, After.DESYNCED), error_replies=2)
def body_read_as_next_header(c: HostileClient) -> Outcome:
    """A header claiming 0xffffffff bytes followed by a 16-byte body: the server refuses the
    header, then reads the body as a header (flags 7: not a command) and refuses that too, so
    the client's next request is answered out of turn. A client that lies about sizes
    desynchronises its own connection, and only its own."""
    return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, CONFIG_REGION_INDEX, 4),
                 size=0xFFFFFFFF)


@case(DISCONNECT, client_failure=True, error_replies=1, uses_timeout=True)
def body_never_sent(c: HostileClient) -> Outcome:
    """A REGION_WRITE header claiming 40 bytes of body, then silence."""
    c.send(Command.REGION_WRITE, size=HEADER.size + 40)
    try:
        c.recv_reply(0, Command.REGION_WRITE)
    except ServerClosed:
        return Outcome(Reaction.DISCONNECT)
    return c.disconnected()


@case(HUNG_UP, error_replies=None)
def disconnect_mid_message(c: HostileClient) -> Outcome:
    """A DMA_MAP header and half its body, then the client closes the connection."""
    c.send(Command.DMA_MAP, dma_map_msg(RAM_IOVA, RAM_SIZE)[:12],
           size=HEADER.size + DMA_MAP.size)
    c.sock.shutdown(socket.SHUT_RDWR)
    return Outcome(Reaction.HUNG_UP, after=After.HUNG_UP)


@case(EINVAL_USABLE, error_replies=1)
def unknown_command(c: HostileClient) -> Outcome:
    """Command 99 with a payload."""
    return _send(c, 99, bytes(16))


@case(EINVAL_USABLE, error_replies=1)
def reply_flag_on_a_request(c: HostileClient) -> Outcome:
    """A DEVICE_RESET (no body) flagged as a reply."""
    return _send(c, Command.DEVICE_RESET, flags=FLAG_TYPE_REPLY)


@case(EINVAL_USABLE, error_replies=1)
def second_version(c: HostileClient) -> Outcome:
    """VERSION again on a negotiated connection."""
    return _send(c, Command.VERSION, VERSION.pack(0, PROTOCOL_MINOR) + b"{}\0")


@case(DISCONNECT, client_failure=True, error_replies=0, uses_timeout=True)
def replies_never_read(c: HostileClient) -> Outcome:
    """DEVICE_GET_INFO requests until the socket is full, and never a reply read."""
    msg = HEADER.pack(0, Command.DEVICE_GET_INFO, HEADER.size + DEVICE_INFO.size, 0, 0)
    msg += DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0)
    c.sock.setblocking(False)
    with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
        while True:
            c.sock.send(msg * 256)
    c.sock.settimeout(c.timeout)
    if not c.wait_hangup():
        raise AssertionError("the server kept a client that reads no replies")
    return c.disconnected()


@case(OK_USABLE, error_replies=0)
def fds_on_a_request_that_takes_none(c: HostileClient) -> Outcome:
    """A config-space REGION_READ carrying 4 eventfds (the server must close them)."""
    fds = [os.eventfd(0) for _ in range(4)]
    try:
        return _send(c, Command.REGION_READ, REGION_ACCESS.pack(0, CONFIG_REGION_INDEX, 4),
                     tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)


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
