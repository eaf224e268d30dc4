"""VfuContext: one libvfio-user PCI device context, as a typed Python object.

Lifecycle: construct (creates the listening socket path and PCI config space) -> set_ids/
set_class/set_revision/add_capability/setup_* -> realize() -> attach() until True -> run() whenever
fileno() is readable -> close(). Single-threaded: every method and every callback runs on the
thread that calls run()/attach()/close(); libvfio-user is not thread-safe. The configuration
calls up to realize() are VfuContextSetup's (harness.vfu.context_setup); this module holds the
context's life, its client connection and the callback bodies.

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
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from harness.vfu import callbacks, liblog
from harness.vfu._vfu import ffi, lib
from harness.vfu.context_setup import VfuContextSetup
from harness.vfu.dmaregs import DmaRegistry
from harness.vfu.errors import ClientDropped, Disconnected, VfuError, error_from_errno
from harness.vfu.latency import LatencyRecorder
from harness.vfu.liblog import lib_log, syslog_level_for
from harness.vfu.mapcachectl import map_cache_on, map_cache_stats
from harness.vfu.model import ResetType
from harness.vfu.regions import RegionHandlers
from harness.vfu.wire import WireTaker

log = logging.getLogger(__name__)

#: Seconds a client may take to finish a message it started, or to read a reply (QEMU's own
#: x-msg-timeout is 5 s: a QEMU that waits longer for us has given up already).
DEFAULT_CLIENT_TIMEOUT = 5.0
#: Requests one run() handles at most, so a client that never stops sending cannot starve the
#: rest of the event loop (the socket stays readable: the loop comes back at once).
RUN_LIMIT = 1024
#: run() calls after shutting a failed connection down before the library must have taken its
#: reset path (each consumes at least one queued header; the client can queue no more).
_DROP_LIMIT = 1 << 16


def memory_barrier() -> None:
    """Full memory fence (__sync_synchronize), for publishing ring indices to the guest."""
    lib.harness_mb()


def _shutdown(fd: int) -> None:
    """shutdown(fd, SHUT_RDWR) on a socket this process does not own as a Python object."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:  # already shut down or reset by the peer: what we wanted
        log.debug("shutdown of the client connection: %s", exc)
    finally:
        sock.close()


class VfuContext(VfuContextSetup):
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
        self._wire = WireTaker(socket_path, client_timeout)
        self.counters = self._wire.counters
        # Process-wide in C; every context of a process reads the same environment.
        lib.harness_map_cache_enable(int(map_cache_on()))
        self._attached = False
        self._conn_fd = -1
        self._pristine_config: bytes | None = None
        self._regions = RegionHandlers(socket_path, self.config_space)
        self._dma = DmaRegistry()
        self._dma.on_map_failed = self._map_failed
        self._on_reset: Callable[[ResetType], None] | None = None
        self._deferred: BaseException | None = None
        self._config: memoryview | None = None
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
                lib.vfu_setup_log(ctx, lib.harness_log_cb, syslog_level_for(lib_log)),
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

    # -- running ---------------------------------------------------------------------------

    @property
    def message_origin(self) -> float:
        """The earliest monotonic time the requests run() is about to handle can have arrived;
        the server loop sets it before each run() (harness.vfu.latency explains why)."""
        return self._dma.message_origin

    @message_origin.setter
    def message_origin(self, origin: float) -> None:
        self._dma.message_origin = origin

    @property
    def message_woke(self) -> bool:
        """Whether message_origin is a wake-up of a loop that slept (harness.vfu.dmaregs)."""
        return self._dma.message_woke

    @message_woke.setter
    def message_woke(self, woke: bool) -> None:
        self._dma.message_woke = woke

    @property
    def dma_latency(self) -> dict[str, LatencyRecorder]:
        """DMA_MAP/UNMAP latency recorders by figure (harness.vfu.dmaregs)."""
        return self._dma.latency

    @property
    def dma_events(self) -> int:
        """DMA_MAP/UNMAP callbacks so far (the loop polls harder while this moves)."""
        return self._dma.events

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
        self._wire.take()
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
        self._dma.run_entry = time.monotonic()
        rc = lib.vfu_run_ctx(ctx)
        err = ffi.errno
        self._wire.take()
        # The reply is out: the owner's map work and the bookkeeping are off the guest's path.
        self._dma.apply_maps()
        self._dma.file_latency()
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

    def stats(self) -> dict[str, object]:
        """Refusal counters (WireCounters), whether a client is attached, DMA latencies."""
        return {"attached": self._attached, **self.counters.as_dict(),
                "dma_latency": {k: r.summary() for k, r in self.dma_latency.items()},
                "map_cache": map_cache_stats()}

    def irq_trigger(self, vector: int) -> bool:
        """Signal MSI-X vector; False if the client has not given an eventfd for it yet."""
        rc = lib.vfu_irq_trigger(self._live(), vector)
        if rc < 0 and ffi.errno == errno.ENOENT:
            return False
        self._check(rc, f"vfu_irq_trigger({vector})")
        return True

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
            self._wire.take()
            self._ctx = None
            self._attached = False
            self._unlink_stale_socket()
            # Callbacks can no longer run: drop them so their closures can be collected.
            self._regions.clear()
            self._dma.clear()
            self._on_reset = None
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

    def _map_failed(self, exc: BaseException) -> None:
        """on_map raised in DmaRegistry.apply_maps: what the DMA register trampoline does with
        its callback's exception (harness.vfu.callbacks.failed)."""
        callbacks.failed(lambda: self, "DMA register", exc, "dma_register")

    def _count_failure(self, kind: str, what: str, exc: BaseException) -> None:
        c = self.counters
        c.callback_failures[kind] = c.callback_failures.get(kind, 0) + 1
        c.last_callback_failure = f"{what}: {exc}"

    def _cb_log(self, level: int, msg: str) -> None:
        liblog.emit(self.socket_path, level, msg)

    def _cb_region(self, index: int, buf: Any, count: int, offset: int, is_write: bool) -> int:
        return self._regions.access(index, buf, count, offset, is_write)

    def _cb_reset(self, kind: int) -> None:
        if self._on_reset is not None:
            self._on_reset(ResetType(kind))

    def _cb_dma_register(self, info: Any) -> None:
        self._dma.register(info)

    def _cb_dma_unregister(self, info: Any) -> None:
        self._dma.unregister(info)
