"""VfuContext: one libvfio-user PCI device context, as a typed Python object.

Lifecycle: construct (creates the listening socket path and PCI config space) -> set_ids/
set_class/set_revision/add_capability/setup_* -> realize() -> attach() until True -> run() whenever
fileno() is readable -> close(). Single-threaded: every method and every callback runs on the
thread that calls run()/attach()/close(); libvfio-user is not thread-safe.

Callbacks run inside run() (and inside close(), which unregisters DMA and resets). Exceptions
they raise never reach C (see harness.vfu.callbacks); the C call then fails with EIO.

Client failures (what this libvfio-user allows, and what the context adds):
- attach() accepts one connection and reads its VERSION; if that fails the library has already
  closed the connection and keeps listening on the same socket: attach() raises VfuError and the
  next attach() takes the next client. Nothing reached the device.
- run() raises Disconnected when the client is gone: the library has then unregistered every DMA
  region, called the reset callback with LOST_CONN, closed the eventfds and the connection, and
  listens again on the same socket. The context also restores the PCI config space it had at
  realize(), so the next client finds the device as after power-on (the owner resets the device
  itself).
- Any other run() failure leaves the connection in an unknown state (the library's own
  vfu_reset_ctx is private): the context shuts the connection down and runs the library until it
  takes that same reset path, then raises ClientDropped. One context serves any number of
  clients, one at a time; it is never re-created.
- Every connection has a timeout (``client_timeout``) for a message the client started to send
  and for a reply it does not read (harness.vfu.build's client guard): the connection is shut
  down then, so no client can stall the server.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, NamedTuple

from harness import knobs
from harness.vfu import callbacks, mapcache
from harness.vfu._vfu import ffi, lib
from harness.vfu.errors import ClientDropped, Disconnected, VfuError, error_from_errno
from harness.vfu.latency import LatencyRecorder
from harness.vfu.model import PROT_WRITE, DmaRegion, ResetType

log = logging.getLogger(__name__)
#: libvfio-user's own messages land here.
lib_log = logging.getLogger("harness.vfu.libvfio_user")

ReadFn = Callable[[int, int], bytes]
WriteFn = Callable[[int, memoryview], None]

_SYSLOG_TO_LOGGING = {
    lib.LOG_ERR: logging.ERROR,
    lib.LOG_WARNING: logging.WARNING,
    lib.LOG_NOTICE: logging.INFO,
    lib.LOG_INFO: logging.INFO,
    lib.LOG_DEBUG: logging.DEBUG,
}

#: MSI-X table entries and PBA bits, in bytes (PCI spec; the table is QEMU's to emulate).
MSIX_ENTRY_SIZE = 16
#: Offset of the PBA when it shares the table's BAR and none is given (QEMU's own layout).
MSIX_DEFAULT_PBA_ALIGN = 0x800
#: Seconds a client may take to finish a message it started, or to read a reply (QEMU's own
#: x-msg-timeout is 5 s: a QEMU that waits longer for us has given up already).
DEFAULT_CLIENT_TIMEOUT = 5.0
#: Requests one run() handles at most, so a client that never stops sending cannot starve the
#: rest of the event loop (the socket stays readable: the loop comes back at once).
RUN_LIMIT = 1024
#: run() calls after shutting a failed connection down before the library must have taken its
#: reset path (each consumes at least one queued header; the client can queue no more).
_DROP_LIMIT = 1 << 16

#: vfio-user command numbers -> names, for the error reply counters.
COMMAND_NAMES = {
    lib.VFIO_USER_VERSION: "VERSION",
    lib.VFIO_USER_DMA_MAP: "DMA_MAP",
    lib.VFIO_USER_DMA_UNMAP: "DMA_UNMAP",
    lib.VFIO_USER_DEVICE_GET_INFO: "DEVICE_GET_INFO",
    lib.VFIO_USER_DEVICE_GET_REGION_INFO: "DEVICE_GET_REGION_INFO",
    lib.VFIO_USER_DEVICE_GET_REGION_IO_FDS: "DEVICE_GET_REGION_IO_FDS",
    lib.VFIO_USER_DEVICE_GET_IRQ_INFO: "DEVICE_GET_IRQ_INFO",
    lib.VFIO_USER_DEVICE_SET_IRQS: "DEVICE_SET_IRQS",
    lib.VFIO_USER_REGION_READ: "REGION_READ",
    lib.VFIO_USER_REGION_WRITE: "REGION_WRITE",
    lib.VFIO_USER_DMA_READ: "DMA_READ",
    lib.VFIO_USER_DMA_WRITE: "DMA_WRITE",
    lib.VFIO_USER_DEVICE_RESET: "DEVICE_RESET",
    lib.VFIO_USER_DIRTY_PAGES: "DIRTY_PAGES",
}


class _Region(NamedTuple):
    read: ReadFn
    write: WriteFn


class WireCounters:
    """What the context refused, counted where it happens (exact, unlike log lines).

    - ``error_replies``: error replies libvfio-user sent, by command name (counted in the
      sendmsg() wrapper of harness.vfu.build, so a refusal is 1 whatever the library logs).
      A request sent without wanting a reply (a posted REGION_WRITE) that the library refuses
      sends nothing and is counted nowhere; one that reaches a callback is counted below.
    - ``callback_failures``: callbacks that failed, by kind (region_read, region_write, reset,
      dma_register, dma_unregister): each one is a request the device refused or a device bug.
    - ``refused_maps``: DMA_MAPs the client guard refused before the library took them (each is
      also an error reply); ``timeouts``: connections shut down for a stalled message or reply.
    """

    def __init__(self) -> None:
        self.error_replies: dict[str, int] = {}
        self.callback_failures: dict[str, int] = {}
        self.refused_maps = 0
        self.timeouts = 0
        self.last_error_reply = ""
        self.last_callback_failure = ""
        self.last_refused_map = ""

    @property
    def error_replies_total(self) -> int:
        return sum(self.error_replies.values())

    @property
    def callback_failures_total(self) -> int:
        return sum(self.callback_failures.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "error_replies": self.error_replies_total,
            "error_replies_by_command": dict(self.error_replies),
            "last_error_reply": self.last_error_reply,
            "callback_failures": self.callback_failures_total,
            "callback_failures_by_kind": dict(self.callback_failures),
            "last_callback_failure": self.last_callback_failure,
            "refused_maps": self.refused_maps,
            "last_refused_map": self.last_refused_map,
            "timeouts": self.timeouts,
        }


def memory_barrier() -> None:
    """Full memory fence (__sync_synchronize), for publishing ring indices to the guest."""
    lib.harness_mb()


def _syslog_level_for(logger: logging.Logger) -> int:
    """The most verbose libvfio-user level the logger would actually emit (saves formatting)."""
    level = logger.getEffectiveLevel()
    if level <= logging.DEBUG:
        return lib.LOG_DEBUG
    if level <= logging.INFO:
        return lib.LOG_INFO
    if level <= logging.WARNING:
        return lib.LOG_WARNING
    return lib.LOG_ERR


#: HARNESS_WIRE_TAKE=scan turns _take_wire's fast path off (the A/B's old side).
WIRE_TAKE_ENV = "HARNESS_WIRE_TAKE"


def wire_take_fast() -> bool:
    """False when HARNESS_WIRE_TAKE=scan (the counters scanned after every call), True for
    fast (the default); ValueError for anything else, so a mistyped A/B side fails loudly."""
    return knobs.choice(WIRE_TAKE_ENV, ("fast", "scan"), "fast") == "fast"


#: HARNESS_MAP_CACHE=off: libvfio-user mmaps every DMA region itself (harness.vfu.mapcache).
MAP_CACHE_ENV = "HARNESS_MAP_CACHE"


def map_cache_on() -> bool:
    """False when HARNESS_MAP_CACHE=off, True for on (the default); ValueError for anything
    else, so a mistyped A/B side fails loudly."""
    return knobs.choice(MAP_CACHE_ENV, ("on", "off"), "on") == "on"


def map_cache_stats() -> dict[str, int]:
    """The mapping cache's counters for this process: hits, fallbacks, files mapped/released."""
    out = ffi.new("uint64_t[4]")
    lib.harness_map_cache_stats(out)
    return {name: int(out[i]) for i, name in enumerate(mapcache.STATS)}


def _shutdown(fd: int) -> None:
    """shutdown(fd, SHUT_RDWR) on a socket this process does not own as a Python object."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:  # already shut down or reset by the peer: what we wanted
        log.debug("shutdown of the client connection: %s", exc)
    finally:
        sock.close()


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class VfuContext:
    """A vfio-user PCI device server context bound to a UNIX socket path."""

    def __init__(
        self,
        socket_path: str,
        *,
        pci_express: bool = True,
        client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
    ) -> None:
        if not 0 < client_timeout <= 3600:
            raise ValueError(f"client timeout {client_timeout} s out of range (0, 3600]")
        self.socket_path = socket_path
        self.client_timeout = client_timeout
        self.counters = WireCounters()
        self._wire = ffi.new("harness_wire_t *")
        # _take_wire's fast path: one bytes comparison of the whole block against zeros.
        self._wire_buf = ffi.buffer(self._wire)
        self._wire_zero = bytes(len(self._wire_buf))
        self._wire_fast = wire_take_fast()
        # Process-wide in C; every context of a process reads the same environment.
        lib.harness_map_cache_enable(int(map_cache_on()))
        self._attached = False
        self._conn_fd = -1
        self._pristine_config: bytes | None = None
        self._regions: dict[int, _Region] = {}
        #: Capabilities served by callbacks: (config offset, size, handlers relative to the cap).
        self._callback_caps: list[tuple[int, int, _Region]] = []
        self._dma_regions: dict[tuple[int, int], DmaRegion] = {}
        self._on_map: Callable[[DmaRegion], None] | None = None
        self._on_unmap: Callable[[DmaRegion], None] | None = None
        self._on_reset: Callable[[ResetType], None] | None = None
        self._deferred: BaseException | None = None
        self._config: memoryview | None = None
        #: The earliest monotonic time the requests run() is about to handle can have arrived;
        #: the server loop sets it before each run() (harness.vfu.latency explains why).
        self.message_origin = 0.0
        #: DMA_MAP and DMA_UNMAP reply latency (origin -> end of callback) and callback time.
        #: ``*_queue``: origin -> the vfu_run_ctx call that handled it; ``*_library``: that
        #: call's entry -> our callback (reading the message, mmap of its fd).
        self.dma_latency = {f"{op}_{part}": LatencyRecorder() for op in ("map", "unmap")
                            for part in ("reply", "callback", "queue", "library")}
        self._run_entry = 0.0
        #: DMA_MAP/UNMAP callbacks so far (the loop polls harder while this moves).
        self.dma_events = 0
        self._config_size = lib.PCI_CFG_SPACE_EXP_SIZE if pci_express else lib.PCI_CFG_SPACE_SIZE
        self._unlink_stale_socket()
        # The handle is how trampolines find this object; it must outlive the C context.
        self._handle = ffi.new_handle(self)
        ctx = lib.vfu_create_ctx(
            lib.VFU_TRANS_SOCK,
            os.fsencode(socket_path),
            lib.LIBVFIO_USER_FLAG_ATTACH_NB,
            self._handle,
            lib.VFU_DEV_TYPE_PCI,
        )
        if ctx == ffi.NULL:
            raise error_from_errno(ffi.errno, f"vfu_create_ctx({socket_path!r})")
        self._ctx: Any = ctx
        try:
            self._check(
                lib.vfu_setup_log(ctx, lib.harness_log_cb, _syslog_level_for(lib_log)),
                "vfu_setup_log",
            )
            pci_type = lib.VFU_PCI_TYPE_EXPRESS if pci_express else lib.VFU_PCI_TYPE_CONVENTIONAL
            self._check(
                lib.vfu_pci_init(ctx, pci_type, lib.PCI_HEADER_TYPE_NORMAL, 0), "vfu_pci_init"
            )
        except BaseException:
            self.close()
            raise

    # -- helpers ---------------------------------------------------------------------------

    def _unlink_stale_socket(self) -> None:
        # A socket left by a dead server makes bind() fail with EADDRINUSE. Only ever remove a
        # socket: a regular file at that path is somebody's data, let bind() report it.
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(st.st_mode):
            log.debug("removing stale socket %s", self.socket_path)
            os.unlink(self.socket_path)

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
            self._callback_caps.append((off, len(data), _Region(read, write)))
        return off

    def _serve_config_space(self) -> None:
        """Register the config-space region callback (once): header and library-handled caps
        never reach it; callback caps, and config space outside any cap, do."""
        cfg = lib.VFU_PCI_DEV_CFG_REGION_IDX
        if cfg in self._regions:
            return
        rc = lib.vfu_setup_region(
            self._live(), cfg, self._config_size, callbacks.region_trampoline(cfg),
            lib.VFU_REGION_FLAG_RW, ffi.NULL, 0, -1, 0,
        )  # fmt: skip
        self._check(rc, "vfu_setup_region(config space)")
        self._regions[cfg] = _Region(self._config_outside_read, self._config_outside_write)

    def _config_outside_read(self, offset: int, count: int) -> bytes:
        # What the library does itself without a callback: the bytes as they are.
        return bytes(self.config_space()[offset : offset + count]).ljust(count, b"\0")

    def _config_outside_write(self, offset: int, data: memoryview) -> None:
        # Unreachable: _cb_config refuses these before (as the library does without a callback).
        raise OSError(errno.EINVAL, f"config space write at {offset:#x} outside any register")

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
        self._regions[index] = _Region(read, write)

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
        if not 1 <= nr_vectors <= lib.PCI_MSIX_FLAGS_QSIZE + 1:
            raise ValueError(f"MSI-X vector count {nr_vectors} out of range")
        table_size = nr_vectors * MSIX_ENTRY_SIZE
        pba_size = _align_up(nr_vectors, 64) // 8
        if pba_offset is None:
            pba_offset = (
                _align_up(table_offset + table_size, MSIX_DEFAULT_PBA_ALIGN)
                if pba_bar == table_bar
                else 0
            )
        for name, off in (("table", table_offset), ("PBA", pba_offset)):
            if off % 8:
                raise ValueError(f"MSI-X {name} offset {off:#x} is not 8-byte aligned")
        if (
            pba_bar == table_bar
            and pba_offset < table_offset + table_size
            and (table_offset < pba_offset + pba_size)
        ):
            raise ValueError("MSI-X table and PBA overlap")
        self._check(
            lib.vfu_setup_device_nr_irqs(self._live(), lib.VFU_DEV_MSIX_IRQ, nr_vectors),
            "vfu_setup_device_nr_irqs(MSIX)",
        )
        cap = struct.pack(
            "<BBHII",
            lib.PCI_CAP_ID_MSIX,
            0,  # next pointer: libvfio-user links the list
            nr_vectors - 1,  # Table Size is encoded as N-1
            table_offset | table_bar,  # low 3 bits: BIR
            pba_offset | pba_bar,
        )
        assert len(cap) == lib.PCI_CAP_MSIX_SIZEOF
        # Not read-only: the guest must be able to flip Enable and Function Mask.
        self.add_capability(cap, readonly=False)
        bar_sizes: dict[int, int] = {}
        for bar, end in ((table_bar, table_offset + table_size), (pba_bar, pba_offset + pba_size)):
            bar_sizes[bar] = max(bar_sizes.get(bar, 0), end)
        for bar, end in bar_sizes.items():
            if bar not in self._regions:
                self._setup_msix_bar(bar, end)

    def _setup_msix_bar(self, bar: int, end: int) -> None:
        size = 4096
        while size < end:
            size *= 2

        def read(offset: int, count: int) -> bytes:
            # Reads reaching us are PBA reads (QEMU owns the table): nothing pending here.
            return bytes(count)

        def write(offset: int, data: memoryview) -> None:
            log.debug("ignoring MSI-X BAR%d write at %#x (%d bytes)", bar, offset, len(data))

        self.setup_region(bar, size, read, write)

    def setup_dma(
        self, on_map: Callable[[DmaRegion], None], on_unmap: Callable[[DmaRegion], None]
    ) -> None:
        """Get told about guest memory. on_unmap receives the same DmaRegion object on_map got;
        every view derived from region.view must be dropped before on_unmap returns."""
        self._check(
            lib.vfu_setup_device_dma(
                self._live(), lib.harness_dma_register_cb, lib.harness_dma_unregister_cb
            ),
            "vfu_setup_device_dma",
        )
        self._on_map, self._on_unmap = on_map, on_unmap

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

    # -- running ---------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether a client is attached (between a successful attach() and its Disconnected)."""
        return self._attached

    def attach(self) -> bool:
        """Accept a client and negotiate; False while nobody is connecting.

        Negotiation reads the client's VERSION message blocking (libvfio-user's design), which
        QEMU sends right after connecting; a client that does not send it within the client
        timeout is dropped. A failed negotiation raises VfuError (a Disconnected if the client
        hung up); the library has closed that connection and listens again.
        """
        ctx = self._live()
        # Read by the accept() wrapper, which only ever runs inside vfu_attach_ctx.
        lib.harness_set_client_timeout(max(1, round(self.client_timeout * 1000)))
        rc = lib.vfu_attach_ctx(ctx)
        err = ffi.errno
        self._take_wire()
        if rc < 0 and err in (errno.EAGAIN, errno.EWOULDBLOCK):
            self._raise_deferred()
            return False
        if rc < 0:
            self._raise_deferred()
            raise error_from_errno(err, "vfu_attach_ctx")
        self._raise_deferred()
        self._attached = True
        self._conn_fd = int(lib.vfu_get_poll_fd(ctx))
        return True

    def fileno(self) -> int:
        """The fd to poll: the listening socket before attach, the connection after."""
        return self._check(lib.vfu_get_poll_fd(self._live()), "vfu_get_poll_fd")

    def run(self, limit: int = RUN_LIMIT) -> int:
        """Handle the requests already queued on the socket (at most ``limit``); returns how
        many.

        Raises Disconnected when the client went away (callbacks have then seen every DMA
        region unregistered and a LOST_CONN reset), ClientDropped when a request failed in a
        way that left the connection unusable and the context dropped the client. Either way
        the config space is back to its state at realize() and attach() takes the next client.
        """
        ctx = self._live()
        total = 0
        timeouts = self.counters.timeouts
        try:
            while total < limit:
                # Non-blocking mode: one request per call, 0 once the socket would block.
                n = self._run_once(ctx)
                if n == 0:
                    break
                total += n
        except Disconnected as exc:
            self._detached()
            if self.counters.timeouts != timeouts and not isinstance(exc, ClientDropped):
                # The client guard shut the connection down: the client stalled, it did not
                # leave.
                raise ClientDropped(errno.ETIMEDOUT, f"client stalled for more than "
                                    f"{self.client_timeout:g} s; client dropped") from exc
            raise
        except VfuError as exc:
            if not self._attached:
                raise
            raise self._drop_client(ctx, exc) from exc
        return total

    def _run_once(self, ctx: Any) -> int:
        self._run_entry = time.monotonic()
        rc = lib.vfu_run_ctx(ctx)
        err = ffi.errno
        self._take_wire()
        if rc < 0:
            self._raise_deferred()
            raise error_from_errno(err, "vfu_run_ctx")
        self._raise_deferred()
        if self._attached and lib.vfu_get_poll_fd(ctx) != self._conn_fd:
            # do_reply() resets the context when a reply fails with ECONNRESET and then
            # reports success: the connection is gone (closed, LOST_CONN done) all the same.
            raise Disconnected(errno.ENOTCONN, "vfu_run_ctx: connection lost while replying")
        return int(rc)

    def _drop_client(self, ctx: Any, cause: VfuError) -> ClientDropped:
        """Shut the connection down and let the library find that out: it then takes its own
        reset path (regions unregistered, LOST_CONN, connection closed) and listens again."""
        log.debug("dropping the vfio-user client after %s", cause)
        _shutdown(lib.vfu_get_poll_fd(ctx))
        for _ in range(_DROP_LIMIT):
            try:
                self._run_once(ctx)
            except Disconnected:
                self._detached()
                break
            except VfuError as exc:
                log.debug("while dropping the client: %s", exc)
        else:
            raise VfuError(errno.EIO, "vfu_run_ctx: the dropped client's connection never "
                                      f"ended (after {cause})")
        err = cause.errno if cause.errno else errno.EIO
        return ClientDropped(err, f"{cause.strerror or cause}; client dropped")

    def _detached(self) -> None:
        self._attached = False
        self._conn_fd = -1
        if self._pristine_config is not None:
            self.config_space()[:] = self._pristine_config

    def _take_wire(self) -> None:
        """Move the client guard's counters (harness.vfu.build) into this context's: they
        belong to whichever context was inside libvfio-user, and that was this one."""
        w = self._wire
        lib.harness_wire_take(w)
        # Nearly always nothing happened: comparing the block as one buffer (0.35 us) spares
        # the scan of 16 counters through cffi (3.6 us) after every vfu_run_ctx, i.e. at least
        # twice per DMA_MAP/UNMAP the guest's vCPU is waiting on (docs/PERFORMANCE.md).
        if self._wire_fast and self._wire_buf[:] == self._wire_zero:
            return
        c = self.counters
        for cmd in range(lib.HARNESS_NR_COMMANDS):
            n = int(w.error_replies[cmd])
            if n:
                name = COMMAND_NAMES.get(cmd, "other")
                c.error_replies[name] = c.error_replies.get(name, 0) + n
        if any(w.error_replies[cmd] for cmd in range(lib.HARNESS_NR_COMMANDS)):
            cmd, err = int(w.last_cmd), int(w.last_errno)
            c.last_error_reply = (f"{COMMAND_NAMES.get(cmd, f'command {cmd}')}: "
                                  f"{os.strerror(err) if err > 0 else f'error {err}'}")
        if w.refused_maps:
            c.refused_maps += int(w.refused_maps)
            c.last_refused_map = ffi.string(w.last_refusal).decode(errors="replace")
            log.warning("%s: refused %s", self.socket_path, c.last_refused_map)
        if w.timeouts:
            c.timeouts += int(w.timeouts)
            log.warning("%s: client timed out (%.3g s) in the middle of a message or reply: "
                        "connection shut down", self.socket_path, self.client_timeout)

    def stats(self) -> dict[str, object]:
        """Refusal counters (WireCounters), whether a client is attached, DMA latencies."""
        return {"attached": self._attached, **self.counters.as_dict(),
                "dma_latency": {k: r.summary() for k, r in self.dma_latency.items()},
                "map_cache": map_cache_stats()}

    def _timed(self, kind: str, start: float) -> None:
        end = time.monotonic()
        self.dma_events += 1
        lat = self.dma_latency
        lat[f"{kind}_callback"].add(end - start)
        entry = self._run_entry
        lat[f"{kind}_library"].add(start - entry)
        origin = self.message_origin
        if 0 < origin <= entry:
            lat[f"{kind}_reply"].add(end - origin)
            lat[f"{kind}_queue"].add(entry - origin)

    def irq_trigger(self, vector: int) -> bool:
        """Signal MSI-X vector; False if the client has not given an eventfd for it yet."""
        rc = lib.vfu_irq_trigger(self._live(), vector)
        if rc < 0 and ffi.errno == errno.ENOENT:
            return False
        self._check(rc, f"vfu_irq_trigger({vector})")
        return True

    def config_space(self) -> memoryview:
        """The live PCI config space (4 KiB for express, 256 B otherwise), writable.

        Valid until close(); libvfio-user serves the client's config reads from it.
        """
        ctx = self._live()
        if self._config is None:
            raw = ffi.cast("uint8_t *", lib.vfu_pci_get_config_space(ctx))
            self._config = memoryview(ffi.buffer(raw, self._config_size))
        return self._config

    def close(self) -> None:
        """Destroy the context (unregistering DMA, LOST_CONN reset) and remove the socket."""
        ctx = self._ctx
        if ctx is None:
            return
        if self._config is not None:
            self._config.release()
            self._config = None
        try:
            lib.vfu_destroy_ctx(ctx)
        finally:
            self._take_wire()
            self._ctx = None
            self._attached = False
            self._unlink_stale_socket()
            # Callbacks can no longer run: drop them so their closures can be collected.
            self._regions.clear()
            self._callback_caps.clear()
            self._dma_regions.clear()
            self._on_map = self._on_unmap = self._on_reset = None
        self._raise_deferred()

    def __enter__(self) -> VfuContext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- callback bodies (called only from harness.vfu.callbacks, inside a C call) ---------

    def _defer(self, exc: BaseException) -> None:
        if self._deferred is None:
            self._deferred = exc

    def _count_failure(self, kind: str, what: str, exc: BaseException) -> None:
        c = self.counters
        c.callback_failures[kind] = c.callback_failures.get(kind, 0) + 1
        c.last_callback_failure = f"{what}: {exc}"

    def _cb_log(self, level: int, msg: str) -> None:
        lib_log.log(_SYSLOG_TO_LOGGING.get(level, logging.ERROR), "%s: %s", self.socket_path, msg)

    def _cb_config(self, buf: Any, count: int, offset: int, is_write: bool) -> int:
        """Config space the library hands to us: callback caps, and bytes outside any cap."""
        for off, size, region in self._callback_caps:
            if off <= offset < off + size:
                if is_write:
                    if offset + count > off + size:
                        break  # straddles the cap's end: refused whole, below
                    view = memoryview(ffi.buffer(buf, count)).toreadonly()
                    try:
                        region.write(offset - off, view)
                    finally:
                        view.release()
                    return count
                inside = min(count, off + size - offset)
                data = region.read(offset - off, inside)
                rest = self._config_outside_read(offset + inside, count - inside)
                ffi.memmove(buf, data[:inside].ljust(inside, b"\0") + rest, count)
                return count
        if not is_write:
            ffi.memmove(buf, self._config_outside_read(offset, count), count)
            return count
        # Exactly the library's answer when it has no callback (an error reply), logged the
        # same way and not counted as a failed callback: nothing in the device refused it.
        lib_log.error("%s: no callback for write to config space offset %d size %d",
                      self.socket_path, offset, count)
        ffi.errno = errno.EINVAL
        return -1

    def _cb_region(self, index: int, buf: Any, count: int, offset: int, is_write: bool) -> int:
        if index == lib.VFU_PCI_DEV_CFG_REGION_IDX:
            return self._cb_config(buf, count, offset, is_write)
        region = self._regions[index]
        if is_write:
            view = memoryview(ffi.buffer(buf, count)).toreadonly()
            try:
                region.write(offset, view)
            finally:
                # buf is libvfio-user's message buffer, freed after we return: make a kept
                # reference fail loudly instead of reading freed memory.
                view.release()
            return count
        data = region.read(offset, count)
        if len(data) != count:
            raise OSError(
                errno.EINVAL,
                f"region {index} read @{offset:#x}: got {len(data)} bytes for {count}",
            )
        ffi.memmove(buf, data, count)
        return count

    def _cb_reset(self, kind: int) -> None:
        if self._on_reset is not None:
            self._on_reset(ResetType(kind))

    def _cb_dma_register(self, info: Any) -> None:
        start = time.monotonic()
        try:
            self._dma_register(info)
        finally:
            self._timed("map", start)

    def _dma_register(self, info: Any) -> None:
        iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
        size = int(info.iova.iov_len)
        prot = int(info.prot)
        if (iova, size) in self._dma_regions:
            # The library answers a DMA_MAP of exactly a live region by returning that region
            # and calling us again: the device has it already. The new message's fd is left
            # open by the library; the client guard closes it.
            log.debug("DMA region [%#x, %#x) mapped again: already known", iova, iova + size)
            lib.harness_close_duplicate_map_fd()
            return
        view: memoryview | None = None
        # info is valid only now; vaddr already points at `iova` inside the page-aligned mmap
        # (info.mapping), so the view is exactly [vaddr, vaddr + size).
        if info.vaddr != ffi.NULL:
            view = memoryview(ffi.buffer(ffi.cast("uint8_t *", info.vaddr), size))
            if not prot & PROT_WRITE:
                # Writing through a read-only mapping would be a segfault, not an exception.
                view = view.toreadonly()
        region = DmaRegion(iova=iova, size=size, prot=prot, view=view)
        self._dma_regions[(iova, size)] = region
        if self._on_map is not None:
            self._on_map(region)

    def _cb_dma_unregister(self, info: Any) -> None:
        start = time.monotonic()
        try:
            self._dma_unregister(info)
        finally:
            self._timed("unmap", start)

    def _dma_unregister(self, info: Any) -> None:
        iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
        size = int(info.iova.iov_len)
        region = self._dma_regions.pop((iova, size), None)
        if region is None:
            region = DmaRegion(iova=iova, size=size, prot=int(info.prot), view=None)
        try:
            if self._on_unmap is not None:
                self._on_unmap(region)
        finally:
            if region.view is not None:
                # Best effort: views derived from it survive this, hence the on_unmap contract.
                try:
                    region.view.release()
                except BufferError:
                    log.warning(
                        "DMA region [%#x, %#x) still exported after on_unmap", iova, iova + size
                    )
