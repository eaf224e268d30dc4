"""The device process's event loop: one thread, one selector, and the device's work once per turn.

The selector watches libvfio-user's socket (config space, BAR accesses, doorbells, DMA
map/unmap, reset), the packet backend (frames for the guest; one per queue pair with
multiqueue; each watched only while the guest has posted receive buffers) and the control
server's sockets. Every registration's ``data`` is a callable taking the ready event mask, so
the loop dispatches without knowing who registered.
Doorbells only mark queues; the queue work runs in :meth:`DeviceLoop.turn`, after every pending
event has been handled, so it is batched.

The loop takes its collaborators as protocols (an endpoint with ``attach/fileno/run``, the
device, the ledger, the backend), so unit tests run the real loop over a mock driver.

Clients: the loop outlives every vfio-user client. A client whose attach (VERSION negotiation)
fails, or whose requests break the connection (``ClientDropped``), is logged (one ERROR line,
the traceback at DEBUG), counted in ``ClientCounters`` and dropped, and the loop waits for the
next one. A client that attached and then left ends ``serve()`` (QEMU quitting ends the device
process, which then writes its final counters), unless ``serve_forever`` is set.
"""

from __future__ import annotations

import logging
import select
import selectors
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from harness import knobs
from harness.server.control import ControlServer
from harness.vfu.errors import ClientDropped, Disconnected, VfuError

log = logging.getLogger(__name__)

#: How often the IOVA space is sampled (seconds): fragmentation() walks every region.
SAMPLE_INTERVAL = 0.5
#: How long a turn may sleep when nothing is pending (bounds how late a signal is noticed).
IDLE_TIMEOUT = 1.0
#: Pause after a failed attach before the next (a failure that repeats, e.g. out of fds while a
#: connection waits in the backlog, must not spin the loop); control requests are still served.
ATTACH_FAILURE_PAUSE = 0.05
#: Before ring work, while the guest maps through a vIOMMU (DMA_MAP/UNMAP seen in the last
#: turn), keep answering the vfio-user socket for HARNESS_LOOP_POLL_US microseconds: the
#: guest's vCPU waits for each reply, and the map that follows a kick would otherwise wait for
#: the whole TX batch. Off (0) by default since round 12 (docs/PERFORMANCE.md): on the 2-core
#: machines of rounds 8-12 the wait takes the CPU the vCPUs need (two paired A/Bs: TCP both
#: ways better without it in 11 of 12 rounds); round 1's faster machine gained from 100.
POLL_US_ENV = "HARNESS_LOOP_POLL_US"
#: The most HARNESS_LOOP_POLL_US takes (10 ms: far beyond any window that ever paid).
POLL_US_MAX = 10_000


def dma_poll() -> float:
    """The DMA window in seconds from HARNESS_LOOP_POLL_US (whole microseconds, 0 the default:
    off); ValueError for anything else, so a mistyped A/B side fails loudly."""
    return knobs.microseconds(POLL_US_ENV, 0, POLL_US_MAX)


#: How that window is waited: ``spin`` (poll(0) in a loop: lowest wake-up latency, but the CPU
#: is taken from QEMU's vCPU threads on a 2-core host), ``block`` (select() with the time
#: left: the kernel wakes us when the request comes, ~100 us later here) or ``hybrid`` (spin
#: for HYBRID_SPIN after each answer, then block). HARNESS_LOOP_POLL_MODE picks it.
POLL_MODE_ENV = "HARNESS_LOOP_POLL_MODE"
POLL_MODES = ("spin", "block", "hybrid")
HYBRID_SPIN = 20e-6
#: Timeouts below this are waited for in select() (microseconds), not epoll (milliseconds).
SUB_MS = 0.002
#: In what order one round of ready events is handled: ``ready`` (as epoll returns them) or
#: ``endpoint`` (the vfio-user socket first: a DMA_MAP/UNMAP the guest's vCPU waits for is not
#: answered after a whole RX burst of the TAP that became readable before it).
#: HARNESS_LOOP_ORDER picks it, for A/Bs in harness bench net.
ORDER_ENV = "HARNESS_LOOP_ORDER"
ORDERS = ("ready", "endpoint")


def poll_mode() -> str:
    """``spin`` (the default) or ``block`` from HARNESS_LOOP_POLL_MODE; ValueError for anything
    else, so a mistyped A/B side fails loudly instead of measuring the default twice."""
    return knobs.choice(POLL_MODE_ENV, POLL_MODES, "spin")



def endpoint_first() -> bool:
    """True for HARNESS_LOOP_ORDER=endpoint, False for ready (the default); ValueError for
    anything else, so a mistyped A/B side fails loudly."""
    return knobs.choice(ORDER_ENV, ORDERS, "ready") == "endpoint"


EventHandler = Callable[[int], None]


class Endpoint(Protocol):
    """The vfio-user side (a VfuContext): attach a client, then serve its requests."""

    def attach(self) -> bool: ...           # False while nobody is connecting
    def fileno(self) -> int: ...            # listening fd before attach, connection after
    def run(self) -> int: ...               # handle queued requests; raises Disconnected


class Device(Protocol):
    """The device's server-loop API (VirtioNetDevice)."""

    #: Called at the end of every device reset (VirtioPciDevice.reset).
    after_reset: Callable[[], None]

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


@dataclass
class ClientCounters:
    """The vfio-user clients this loop has seen (reported in the device's stats)."""

    #: Clients that attached (negotiated VERSION).
    clients: int = 0
    #: Attach failures plus attached clients dropped after a protocol failure.
    client_failures: int = 0
    #: Attached clients that left, cleanly or dropped.
    disconnects: int = 0
    #: What the last failure was ("attach: ...", "dropped: ...").
    last_failure: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


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
        on_detached: Callable[[], None] = lambda: None,
        sample_iova: Callable[[], None] = lambda: None,
        selector: selectors.BaseSelector | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        serve_forever: bool = False,
        clients: ClientCounters | None = None,
        extra_backends: Sequence[Pollable] = (),
    ) -> None:
        self.endpoint = endpoint
        self.device = device
        self.ledger = ledger
        self.backend = backend
        #: Multiqueue: backend i+1 feeds queue pair i+1 (device.rx_wanted(i+1) and
        #: device.on_backend_readable(i+1)); polled by the same rule as ``backend``.
        self.extra_backends = list(extra_backends)
        self._extra_polled = [False] * len(self.extra_backends)
        #: May be set after construction, before serve() (its commands may need this loop).
        self.control = control
        self.on_attached = on_attached
        #: Called once an attached client is gone (the endpoint listens again by then).
        self.on_detached = on_detached
        self.sample_iova = sample_iova
        self.selector = selector if selector is not None else selectors.DefaultSelector()
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.stop = False
        #: Keep waiting for the next client after one leaves (otherwise serve() returns).
        self.serve_forever = serve_forever
        self.clients = clients if clients is not None else ClientCounters()
        self.turns = 0
        self._attached = False
        self._endpoint_fd = -1
        self._backend_polled = False
        self._next_sample = 0.0
        self._origin = 0.0
        self._woke = False
        self._last_wake = 0.0
        self.dma_poll = dma_poll()
        mode = poll_mode()
        #: How long to spin before blocking, in each wait of the DMA window.
        self.poll_spin = {"spin": float("inf"), "block": 0.0, "hybrid": HYBRID_SPIN}[mode]
        self.endpoint_first = endpoint_first()
        self._dma_seen = 0
        self._poll: select.poll | None = None
        #: The device's timer (VirtioNetDevice.next_timer: a TX hold-off, the end of a
        #: misbehaviour's wrong used.idx), if it has one.
        self._next_timer: Callable[[], float | None] | None = getattr(device, "next_timer", None)
        # The leak check runs at the moment of a reset, not at the next turn: a reset and the
        # driver's new queue set-up can arrive in one batch of vfio-user messages, and a check
        # after both would take the new rings for leaks and reclaim them under the device.
        device.after_reset = lambda: self._check_leaks_at_reset()

    def _check_leaks_at_reset(self) -> None:
        # The guest reset the device (status 0): every mapping must be gone by now.
        self.ledger.check_leaks("reset")

    def request_stop(self) -> None:
        """Stop after the current event (safe from a signal handler: it only sets a flag)."""
        self.stop = True

    # -- the whole run -----------------------------------------------------------------------

    def serve(self) -> None:
        """Wait for a client, then serve it until it leaves or a stop is requested; then
        return, or with ``serve_forever`` wait for the next client."""
        if self.control is not None:
            self.control.register(self.selector)
        while not self.stop:
            if not self.wait_for_client():
                return
            self.connected()
            while not self.stop and self._attached:
                self.run_once()
            if not self.serve_forever:
                return

    def connected(self) -> None:
        """The endpoint attached a client: count it, tell the owner, serve its socket from
        the next run_once() on (serve() calls it; so can a bench driving run_once itself)."""
        self.clients.clients += 1
        self._attached = True
        self.on_attached()
        log.info("vfio-user client connected")
        self._endpoint_fd = self.endpoint.fileno()
        self.selector.register(self._endpoint_fd, selectors.EVENT_READ, self._on_endpoint)
        self._poll = select.poll()
        self._poll.register(self._endpoint_fd, select.POLLIN)

    def wait_for_client(self) -> bool:
        """Poll for a client (serving control requests meanwhile) until one attaches; False
        if told to stop. Clients that fail to attach are counted and dropped."""
        while not self.stop:
            try:
                if self.endpoint.attach():
                    return True
            except VfuError as exc:
                # The endpoint closed that connection itself; nothing reached the device.
                self._client_failed("attach", exc)
                self.dispatch(ATTACH_FAILURE_PAUSE)
                continue
            # Readable listening socket = someone connecting: just try attach() again.
            key = self.selector.register(self.endpoint.fileno(), selectors.EVENT_READ,
                                         _ignore)
            try:
                self.dispatch(self.idle_timeout)
            finally:
                self.selector.unregister(key.fileobj)
        return False

    def _client_failed(self, stage: str, exc: BaseException) -> None:
        self.clients.client_failures += 1
        self.clients.last_failure = f"{stage}: {exc}"
        log.error("vfio-user client failed (%s): %s", stage, exc)
        log.debug("vfio-user client failure (%s)", stage, exc_info=exc)

    # -- one turn ----------------------------------------------------------------------------

    def run_once(self) -> None:
        """One loop turn: wait for events (not at all while TX has work left), handle them,
        then do the per-turn work unless an event stopped the loop."""
        # TX stops after a batch so RX gets a turn: poll without sleeping while work is left.
        timeout = 0.0 if self.device.has_work() else self.idle_timeout
        if self._next_timer is not None:
            due = self._next_timer()  # a TX hold-off or a misbehaviour's hold: wake for it
            if due is not None:
                timeout = min(timeout, max(0.0, due - time.monotonic()))
        self.dispatch(timeout)
        if not self.stop:
            self.turn()

    def dispatch(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds and call the handler of every ready registration."""
        # What is ready already is taken without sleeping; only when nothing is does the loop
        # sleep. So it knows which of the two it did: the endpoint times its DMA replies from
        # the earliest moment the requests can have arrived (harness.vfu.latency): the wake-up
        # of a sleep they ended, else the previous wake-up (they came in during the ring work
        # in between). A threshold on how long select() took cannot tell them apart: a wake-up
        # can take 4 us (same CPU) or 150 us (after idle), a select that finds work up to 15.
        events = self.selector.select(timeout=0)
        slept = not events and timeout > 0
        if slept:
            if timeout < SUB_MS:
                # epoll's timeout is whole milliseconds (rounded up): a hold-off of tens of
                # microseconds would become one. Wait in select(), which has microseconds,
                # then collect what is ready without waiting again.
                try:
                    select.select([k.fd for k in self.selector.get_map().values()], (), (),
                                  timeout)
                    timeout = 0.0
                except ValueError:  # an fd beyond select()'s FD_SETSIZE: epoll's rounding
                    pass
            events = self.selector.select(timeout=timeout)
        woke = self.clock()
        self._woke = slept
        self._origin = woke if slept else self._last_wake
        self._last_wake = woke
        if self.endpoint_first and len(events) > 1:
            fd = self._endpoint_fd
            events.sort(key=lambda e: e[0].fd != fd)  # stable: the rest keep epoll's order
        for key, mask in events:
            key.data(mask)
            if self.stop:
                break

    def turn(self) -> None:
        """The work after each round of events: queues, deferred erases, checks, RX polling."""
        self.turns += 1
        if self.dma_poll > 0 and self._poll is not None:
            self._answer_dma_first()
        self.device.process()
        self.ledger.housekeeping()
        now = self.clock()
        if now >= self._next_sample:
            self.sample_iova()
            self._next_sample = now + SAMPLE_INTERVAL
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
        for i, b in enumerate(self.extra_backends):
            pair = i + 1
            want = self.device.rx_wanted(pair)  # type: ignore[call-arg]
            if want != self._extra_polled[i]:
                if want:
                    self.selector.register(b.fileno(), selectors.EVENT_READ,
                                           lambda _m, p=pair: self._on_extra(p))
                    self.device.on_backend_readable(pair)  # type: ignore[call-arg]
                else:
                    self.selector.unregister(b.fileno())
                self._extra_polled[i] = want

    def _answer_dma_first(self) -> None:
        """While the guest is mapping (DMA messages since the last turn), wait on the
        vfio-user socket for up to ``dma_poll`` seconds (spinning for ``poll_spin``, then
        blocked in select()) and answer what comes."""
        seen = getattr(self.endpoint, "dma_events", 0)
        if seen == self._dma_seen:
            return
        poll = self._poll
        assert poll is not None
        clock = self.clock
        now = clock()
        deadline, limit = now + self.dma_poll, now + 4 * self.dma_poll
        fd, spin = self._endpoint_fd, self.poll_spin
        block_at = now + spin
        while self._attached and not self.stop and now < deadline:
            # select(), not poll(): poll's timeout is whole milliseconds, the window is 100 us.
            ready = (poll.poll(0) if now < block_at
                     else select.select((fd,), (), (), deadline - now)[0])
            if ready:
                self._origin, self._woke = now, True
                self._on_endpoint(0)
                # The guest is active: give its next request the same chance (bounded).
                now = clock()
                deadline, block_at = min(limit, now + self.dma_poll), now + spin
            now = clock()
        self._dma_seen = getattr(self.endpoint, "dma_events", 0)

    # -- event handlers ----------------------------------------------------------------------

    def _on_endpoint(self, _mask: int) -> None:
        if hasattr(self.endpoint, "message_origin"):
            self.endpoint.message_origin = self._origin
        if hasattr(self.endpoint, "message_woke"):
            self.endpoint.message_woke = self._woke
        try:
            self.endpoint.run()
        except ClientDropped as exc:
            self._client_failed("dropped", exc)
            self._detach()
        except Disconnected:
            log.info("vfio-user client disconnected")
            self._detach()

    def _detach(self) -> None:
        """The client is gone and the endpoint listens again: forget its connection, stop
        polling the backend for a device that is about to be reset, tell the owner."""
        self._attached = False
        self.clients.disconnects += 1
        # The endpoint has closed that fd already (selectors ignore the error); unregister it
        # now, before the number can be reused by the next connection.
        self.selector.unregister(self._endpoint_fd)
        self._endpoint_fd = -1
        self._poll = None
        if self._backend_polled:
            self.selector.unregister(self.backend.fileno())
            self._backend_polled = False
        for i, b in enumerate(self.extra_backends):
            if self._extra_polled[i]:
                self.selector.unregister(b.fileno())
                self._extra_polled[i] = False
        self.on_detached()
        if not self.serve_forever:
            self.stop = True

    def _on_backend(self, _mask: int) -> None:
        # A detach earlier in the same round of events may have stopped polling it.
        if self._backend_polled:
            self.device.on_backend_readable()

    def _on_extra(self, pair: int) -> None:
        if self._extra_polled[pair - 1]:
            self.device.on_backend_readable(pair)  # type: ignore[call-arg]

    def close(self) -> None:
        """Release the selector (the fds in it belong to their owners)."""
        self.selector.close()


def _ignore(_mask: int) -> None:
    pass
