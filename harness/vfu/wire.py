"""WireTaker: the client guard's counters, moved into one VfuContext's WireCounters.

The client guard linked into the extension (harness.vfu.build) counts what it sees on the wire
in one process-wide ``harness_wire_t`` block: error replies by command, refused DMA_MAPs,
connections shut down for a stalled message or reply. Those belong to whichever context was
inside libvfio-user, so VfuContext calls ``WireTaker.take()`` after every call into the library.
``HARNESS_WIRE_TAKE=scan`` turns the take's fast path off (the A/B's old side).
"""

from __future__ import annotations

import logging
import os

from harness import knobs
from harness.vfu._vfu import ffi, lib

# The context's messages, under the context's logger name (as before this module existed).
log = logging.getLogger("harness.vfu.context")

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


class WireCounters:
    """What the context refused, counted where it happens (exact, unlike log lines).

    - ``error_replies``: error replies libvfio-user sent, by command name (counted in the
      sendmsg() wrapper of harness.vfu.clientguard, so a refusal is 1 whatever the library logs).
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


#: HARNESS_WIRE_TAKE=scan turns WireTaker.take's fast path off (the A/B's old side).
WIRE_TAKE_ENV = "HARNESS_WIRE_TAKE"


def wire_take_fast() -> bool:
    """False when HARNESS_WIRE_TAKE=scan (the counters scanned after every call), True for
    fast (the default); ValueError for anything else, so a mistyped A/B side fails loudly."""
    return knobs.choice(WIRE_TAKE_ENV, ("fast", "scan"), "fast") == "fast"


class WireTaker:
    """One context's ``counters`` and the ``harness_wire_t`` block they are taken through.

    ``socket_path`` and ``client_timeout`` are the context's, for the log lines.
    """

    def __init__(self, socket_path: str, client_timeout: float) -> None:
        self.socket_path = socket_path
        self.client_timeout = client_timeout
        self.counters = WireCounters()
        self._wire = ffi.new("harness_wire_t *")
        # take()'s fast path: one bytes comparison of the whole block against zeros.
        self._wire_buf = ffi.buffer(self._wire)
        self._wire_zero = bytes(len(self._wire_buf))
        self.fast = wire_take_fast()

    def take(self) -> None:
        """Move the client guard's counters (harness.vfu.build) into this context's: they
        belong to whichever context was inside libvfio-user, and that was this one."""
        w = self._wire
        lib.harness_wire_take(w)
        # Nearly always nothing happened: comparing the block as one buffer (0.35 us) spares
        # the scan of 16 counters through cffi (3.6 us) after every vfu_run_ctx, i.e. at least
        # twice per DMA_MAP/UNMAP the guest's vCPU is waiting on (docs/PERFORMANCE.md).
        if self.fast and self._wire_buf[:] == self._wire_zero:
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
