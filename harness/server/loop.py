"""The device process's event loop: one thread, one selector, and the device's work once per turn.

The selector watches libvfio-user's socket (config space, BAR accesses, doorbells, DMA
map/unmap, reset), the packet backend (frames for the guest; watched only while the guest has
posted receive buffers) and the control server's sockets. Every registration's ``data`` is a
callable taking the ready event mask, so the loop dispatches without knowing who registered.
Doorbells only mark queues; the queue work runs in :meth:`DeviceLoop.turn`, after every pending
event has been handled, so it is batched.

The loop takes its collaborators as protocols (an endpoint with ``attach/fileno/run``, the
device, the ledger, the backend), so unit tests run the real loop over a mock driver.
"""

from __future__ import annotations

import logging
import selectors
import time
from collections.abc import Callable
from typing import Protocol

from harness.server.control import ControlServer
from harness.vfu.errors import Disconnected

log = logging.getLogger(__name__)

#: How often the IOVA space is sampled (seconds): fragmentation() walks every region.
SAMPLE_INTERVAL = 0.5
#: How long a turn may sleep when nothing is pending (bounds how late a signal is noticed).
IDLE_TIMEOUT = 1.0

EventHandler = Callable[[int], None]


class Endpoint(Protocol):
    """The vfio-user side (a VfuContext): attach a client, then serve its requests."""

    def attach(self) -> bool: ...           # False while nobody is connecting
    def fileno(self) -> int: ...            # listening fd before attach, connection after
    def run(self) -> int: ...               # handle queued requests; raises Disconnected


class Device(Protocol):
    """The device's server-loop API (VirtioNetDevice)."""

    resets: int

    def process(self) -> None: ...
    def has_work(self) -> bool: ...
    def rx_wanted(self) -> bool: ...
    def on_backend_readable(self) -> None: ...


class Ledger(Protocol):
    """The map-ops stack's top (DmaLedger): deferred work per turn, leak checks at resets."""

    def housekeeping(self) -> None: ...
    def check_leaks(self, when: str) -> int: ...


class Pollable(Protocol):
    def fileno(self) -> int: ...


class DeviceLoop:
    """Waits for the vfio-user client, then serves it until it leaves or a stop is requested."""

    def __init__(
        self,
        endpoint: Endpoint,
        device: Device,
        ledger: Ledger,
        backend: Pollable,
        control: ControlServer | None = None,
        *,
        on_attached: Callable[[], None] = lambda: None,
        sample_iova: Callable[[], None] = lambda: None,
        selector: selectors.BaseSelector | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.device = device
        self.ledger = ledger
        self.backend = backend
        #: May be set after construction, before serve() (its commands may need this loop).
        self.control = control
        self.on_attached = on_attached
        self.sample_iova = sample_iova
        self.selector = selector if selector is not None else selectors.DefaultSelector()
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.stop = False
        self.turns = 0
        self._backend_polled = False
        self._resets_seen = device.resets
        self._next_sample = 0.0

    def request_stop(self) -> None:
        """Stop after the current event (safe from a signal handler: it only sets a flag)."""
        self.stop = True

    # -- the whole run -----------------------------------------------------------------------

    def serve(self) -> None:
        """Wait for the client, then serve until it disconnects or a stop is requested."""
        if self.control is not None:
            self.control.register(self.selector)
        if not self.wait_for_client():
            return
        self.on_attached()
        log.info("vfio-user client connected")
        self.selector.register(self.endpoint.fileno(), selectors.EVENT_READ, self._on_endpoint)
        while not self.stop:
            self.run_once()

    def wait_for_client(self) -> bool:
        """Poll for the client (serving control requests meanwhile); False if told to stop."""
        while not self.stop:
            if self.endpoint.attach():
                return True
            # Readable listening socket = someone connecting: just try attach() again.
            key = self.selector.register(self.endpoint.fileno(), selectors.EVENT_READ,
                                         _ignore)
            try:
                self.dispatch(self.idle_timeout)
            finally:
                self.selector.unregister(key.fileobj)
        return False

    # -- one turn ----------------------------------------------------------------------------

    def run_once(self) -> None:
        """One loop turn: wait for events (not at all while TX has work left), handle them,
        then do the per-turn work unless an event stopped the loop."""
        # TX stops after a batch so RX gets a turn: poll without sleeping while work is left.
        self.dispatch(0.0 if self.device.has_work() else self.idle_timeout)
        if not self.stop:
            self.turn()

    def dispatch(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds and call the handler of every ready registration."""
        for key, mask in self.selector.select(timeout=timeout):
            key.data(mask)
            if self.stop:
                break

    def turn(self) -> None:
        """The work after each round of events: queues, deferred erases, checks, RX polling."""
        self.turns += 1
        self.device.process()
        self.ledger.housekeeping()
        now = self.clock()
        if now >= self._next_sample:
            self.sample_iova()
            self._next_sample = now + SAMPLE_INTERVAL
        if self.device.resets != self._resets_seen:
            # The guest reset the device (status 0): every mapping must be gone by now.
            self._resets_seen = self.device.resets
            self.ledger.check_leaks("reset")
        want = self.device.rx_wanted()
        if want != self._backend_polled:
            if want:
                self.selector.register(self.backend.fileno(), selectors.EVENT_READ,
                                       self._on_backend)
                # Frames may already be waiting: take them now, not one loop turn later.
                self.device.on_backend_readable()
            else:
                self.selector.unregister(self.backend.fileno())
            self._backend_polled = want

    # -- event handlers ----------------------------------------------------------------------

    def _on_endpoint(self, _mask: int) -> None:
        try:
            self.endpoint.run()
        except Disconnected:
            log.info("vfio-user client disconnected")
            self.stop = True

    def _on_backend(self, _mask: int) -> None:
        self.device.on_backend_readable()

    def close(self) -> None:
        """Release the selector (the fds in it belong to their owners)."""
        self.selector.close()


def _ignore(_mask: int) -> None:
    pass
