"""Host-side test peers for the guest's network tests, verifying every byte against the stream.

``python -m harness.net.peer --netns NAME --results PATH [--bytes N --seed S --udp-count C]``
enters the named network namespace, then serves in one selector loop:

* TCP sink   (port 5001, tcp_guest_to_host): verifies the received stream incrementally; after
  the guest's EOF it answers ``OK <bytes>\\n`` or ``BAD <offset> <why>\\n`` and closes, so the
  guest's KTAP result reflects the host's byte-exact check.
* TCP source (port 5002, tcp_host_to_guest): sends N stream bytes, then EOF.
* UDP echo   (port 5003, udp_mixed): checks each datagram against the schedule, echoes it.
* UDP perf   (port 5004, hnet udp-tx/udp-rx): counts tagged datagrams and answers queries;
  on a start request floods the guest at a paced rate (see :class:`UdpPerf`).
* TCP echo   (port 5005, hnet tcp-rr): echoes every byte at once (TCP_NODELAY), for
  request/response transactions per second.

The perf ports measure, they do not verify streams, and have no entry in the results.

The results JSON (schema in :func:`Peer.snapshot`) is written atomically when the sockets are
listening (so its existence means "ready"), after each completed test, and on exit.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from harness.net.peer_state import (
    CHUNK,
    DEFAULT_BIND,
    DEFAULT_SEED,
    PORT_ECHO,
    PORT_RR,
    PORT_SINK,
    PORT_SOURCE,
    PORT_UDP_PERF,
    RESULTS_VERSION,
    TESTS,
    TcpResult,
    UdpResult,
    _Sink,
    _Source,
)
from harness.net.perfpeer import UdpPerf, register_echo
from harness.net.stream import first_mismatch, stream_bytes, udp_payload

# The module docstring above is also the command's --help text, so the layout is noted here: the
# constants, the results records and the connections' state are in harness.net.peer_state (the
# constants and records are re-exported below).
__all__ = ["CHUNK", "CLONE_NEWNET", "DEFAULT_BIND", "DEFAULT_SEED", "PORT_ECHO", "PORT_RR",
           "PORT_SINK", "PORT_SOURCE", "PORT_UDP_PERF", "RESULTS_VERSION", "TESTS", "Peer",
           "TcpResult", "UdpResult", "enter_netns", "main"]

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """setns(2) into a named (``/run/netns/NAME``) or path-given network namespace.

    Done with ctypes because os.setns only exists from Python 3.12; never creates a namespace.
    """
    path = name if "/" in name else f"/run/netns/{name}"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes * 8 / seconds / 1e6, 3) if seconds > 0 else 0.0


class Peer:
    """The three servers and their results; drive with :meth:`run`."""

    def __init__(
        self,
        results: Path,
        *,
        bind: str = DEFAULT_BIND,
        nbytes: int = 64 << 20,
        seed: int = DEFAULT_SEED,
        udp_count: int = 1000,
        ports: tuple[int, int, int] = (PORT_SINK, PORT_SOURCE, PORT_ECHO),
        perf_ports: tuple[int, int] | None = None,
        timeout: float = 900.0,
        linger: float = 2.0,
        expect: tuple[str, ...] = TESTS,
    ) -> None:
        unknown = set(expect) - set(TESTS)
        if unknown:
            raise ValueError(f"unknown peer tests: {', '.join(sorted(unknown))}")
        self.expect = expect
        self.results_path = results
        self.bind = bind
        self.nbytes = nbytes
        self.seed = seed
        self.udp_count = udp_count
        self.ports = ports
        #: (UDP perf, TCP echo); default: the three test ports' base + 3 and + 4.
        self.perf_ports = perf_ports if perf_ports is not None else (ports[0] + 3, ports[0] + 4)
        self.perf: UdpPerf | None = None
        self.timeout = timeout
        self.linger = linger
        self.status = "starting"
        self.sink = TcpResult()
        self.source = TcpResult()
        self.udp = UdpResult()
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._udp_t0: float | None = None
        self._payloads: dict[int, bytes] = {}

    # ---- results ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Results JSON: {version, status, bind, ports, seed, bytes, udp_count, expect, tests: {
        tcp_guest_to_host: TcpResult, tcp_host_to_guest: TcpResult, udp_mixed: UdpResult}}.
        status: listening | done | timeout | terminated | error."""
        return {
            "version": RESULTS_VERSION,
            "status": self.status,
            "bind": self.bind,
            "ports": {"sink": self.ports[0], "source": self.ports[1], "echo": self.ports[2]},
            "seed": self.seed,
            "bytes": self.nbytes,
            "udp_count": self.udp_count,
            "expect": list(self.expect),
            "tests": {
                "tcp_guest_to_host": asdict(self.sink),
                "tcp_host_to_guest": asdict(self.source),
                "udp_mixed": asdict(self.udp),
            },
        }

    def write_results(self) -> None:
        """tmp + rename: readers see the old or the new file, never a torn one."""
        path = self.results_path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    def all_done(self) -> bool:
        """Every expected test has finished (the guest may run only part of the plan)."""
        states = {
            "tcp_guest_to_host": self.sink.state,
            "tcp_host_to_guest": self.source.state,
            "udp_mixed": self.udp.state,
        }
        return all(states[name] == "done" for name in self.expect)

    # ---- setup ------------------------------------------------------------------------

    def _listen(self, port: int, kind: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.bind, port))
        if kind == socket.SOCK_STREAM:
            s.listen(4)
        s.setblocking(False)
        return s

    def open(self) -> None:
        """Bind all three sockets, then publish the "listening" results file."""
        sink = self._listen(self.ports[0], socket.SOCK_STREAM)
        source = self._listen(self.ports[1], socket.SOCK_STREAM)
        echo = self._listen(self.ports[2], socket.SOCK_DGRAM)
        # Selector data is always a no-argument callable: the loop just calls it.
        self._sel.register(sink, selectors.EVENT_READ, partial(self._accept_sink, sink))
        self._sel.register(source, selectors.EVENT_READ, partial(self._accept_source, source))
        self._sel.register(echo, selectors.EVENT_READ, partial(self._on_udp, echo))
        perf = self._listen(self.perf_ports[0], socket.SOCK_DGRAM)
        self.perf = UdpPerf(perf)
        self.perf.register(self._sel)
        register_echo(self._sel, self._listen(self.perf_ports[1], socket.SOCK_STREAM))
        self.status = "listening"
        self.write_results()
        log.info("listening on %s ports %s", self.bind, self.ports)

    def request_stop(self) -> None:
        self._stop = True

    # ---- TCP sink (guest -> host) -------------------------------------------------------

    def _accept_sink(self, lsock: socket.socket) -> None:
        conn, addr = lsock.accept()
        conn.setblocking(False)
        log.info("sink: connection from %s", addr)
        self.sink.connections += 1
        self.sink.state = "running"
        st = _Sink(conn, time.monotonic())
        self._sel.register(conn, selectors.EVENT_READ, partial(self._on_sink, st))

    def _verify_sink(self, st: _Sink) -> None:
        if st.fill == 0:
            return
        data = memoryview(st.buf)[: st.fill]
        if st.mismatch is None:
            room = max(0, self.nbytes - st.offset)
            bad = first_mismatch(self.seed, st.offset, data[:room])
            if bad is not None:
                st.mismatch, st.why = st.offset + bad, "content"
            elif st.fill > room:
                st.mismatch, st.why = self.nbytes, "more bytes than expected"
        st.offset += st.fill
        st.fill = 0

    def _finish_sink(self, st: _Sink, error: str | None) -> None:
        self._verify_sink(st)
        seconds = time.monotonic() - st.t0
        ok = error is None and st.mismatch is None and st.offset == self.nbytes
        if error is None:
            if ok:
                verdict = f"OK {st.offset}\n"
            elif st.mismatch is not None:
                verdict = f"BAD {st.mismatch} {st.why}\n"
            else:
                verdict = f"BAD {st.offset} short stream ({st.offset} of {self.nbytes} bytes)\n"
            try:
                st.sock.setblocking(True)
                st.sock.settimeout(5.0)
                st.sock.sendall(verdict.encode())
            except OSError as e:
                log.warning("sink: could not send verdict: %s", e)
        self._sel.unregister(st.sock)
        st.sock.close()
        self.sink = TcpResult(
            state="done",
            ok=ok,
            bytes=st.offset,
            seconds=round(seconds, 3),
            mbps=_mbps(st.offset, seconds),
            first_mismatch=st.mismatch,
            error=error or (None if ok else st.why or "short stream"),
            connections=self.sink.connections,
        )
        log.info("sink: %s", self.sink)
        self.write_results()

    def _on_sink(self, st: _Sink) -> None:
        try:
            n = st.sock.recv_into(memoryview(st.buf)[st.fill :])
        except BlockingIOError:
            return
        except OSError as e:
            self._finish_sink(st, f"recv: {e}")
            return
        if n == 0:
            self._finish_sink(st, None)
            return
        st.fill += n
        if st.fill == len(st.buf):
            self._verify_sink(st)

    # ---- TCP source (host -> guest) -----------------------------------------------------

    def _accept_source(self, lsock: socket.socket) -> None:
        conn, addr = lsock.accept()
        conn.setblocking(False)
        log.info("source: connection from %s", addr)
        self.source.connections += 1
        self.source.state = "running"
        st = _Source(conn, time.monotonic())
        self._sel.register(conn, selectors.EVENT_WRITE, partial(self._on_source, st))

    def _finish_source(self, st: _Source, error: str | None) -> None:
        seconds = time.monotonic() - st.t0
        self._sel.unregister(st.sock)
        st.sock.close()
        ok = error is None and st.sent == self.nbytes
        self.source = TcpResult(
            state="done",
            ok=ok,
            bytes=st.sent,
            seconds=round(seconds, 3),
            mbps=_mbps(st.sent, seconds),
            error=error,
            connections=self.source.connections,
        )
        log.info("source: %s", self.source)
        self.write_results()

    def _on_source(self, st: _Source) -> None:
        if st.finished_sending:
            # Waiting for the guest's EOF: it closes once it has read and checked everything.
            try:
                data = st.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError as e:
                self._finish_source(st, f"after sending: {e}")
                return
            if not data:
                self._finish_source(st, None)
            return
        try:
            while True:
                if not st.pending:
                    left = self.nbytes - st.sent
                    if left <= 0:
                        st.sock.shutdown(socket.SHUT_WR)
                        st.finished_sending = True
                        self._sel.modify(
                            st.sock, selectors.EVENT_READ, partial(self._on_source, st)
                        )
                        return
                    st.pending = memoryview(stream_bytes(self.seed, st.sent, min(CHUNK, left)))
                n = st.sock.send(st.pending)
                st.sent += n
                st.pending = st.pending[n:]
        except BlockingIOError:
            return
        except OSError as e:
            self._finish_source(st, f"send: {e}")

    # ---- UDP echo -----------------------------------------------------------------------

    def _payload(self, index: int) -> bytes:
        p = self._payloads.get(index)
        if p is None:
            p = udp_payload(self.seed, index)
            # Only the expected datagram and its predecessor are ever compared.
            self._payloads = {k: v for k, v in self._payloads.items() if k >= index - 1}
            self._payloads[index] = p
        return p

    def _on_udp(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded batch so the TCP handlers are not starved
            try:
                data, addr = sock.recvfrom(65536)
            except BlockingIOError:
                return
            now = time.monotonic()
            if self._udp_t0 is None:
                self._udp_t0 = now
                self.udp.state = "running"
            nxt = self.udp.good
            if nxt < self.udp_count and data == self._payload(nxt):
                self.udp.good += 1
                self.udp.bytes += len(data)
            elif nxt > 0 and data == self._payload(nxt - 1):
                self.udp.dup += 1  # a retransmit: our echo or its datagram was lost
            else:
                self.udp.bad += 1
                if self.udp.first_bad is None:
                    self.udp.first_bad = nxt
                log.warning("udp: bad datagram (%d bytes) while expecting #%d", len(data), nxt)
            try:
                # Echo verbatim even when bad, so the guest sees the corruption too.
                sock.sendto(data, addr)
            except OSError as e:
                log.warning("udp: echo failed: %s", e)
            self.udp.seconds = round(now - self._udp_t0, 3)
            if self.udp.state != "done" and self.udp.good == self.udp_count:
                self.udp.state = "done"
                self.udp.ok = self.udp.bad == 0
                log.info("udp: %s", self.udp)
                self.write_results()

    # ---- loop ---------------------------------------------------------------------------

    def run(self) -> str:
        """Serve until all tests are done (plus ``linger``), stopped, or timed out."""
        if self.status != "listening":
            self.open()
        deadline = time.monotonic() + self.timeout
        done_at: float | None = None
        status = "done"
        while True:
            now = time.monotonic()
            if self._stop:
                status = "terminated"
                break
            if now > deadline:
                status = "timeout"
                break
            if done_at is None and self.all_done():
                # Keep echoing a little: the guest may still retransmit if our last echo was lost.
                done_at = now
            if done_at is not None and now - done_at >= self.linger:
                break
            for key, _events in self._sel.select(timeout=0.2):
                key.data()
        if self.udp.state == "running":
            self.udp.ok = False
        self.status = status
        self.write_results()
        self.close()
        return status

    def close(self) -> None:
        for key in list(self._sel.get_map().values()):
            self._sel.unregister(key.fileobj)
            sock = key.fileobj
            if isinstance(sock, socket.socket):
                sock.close()
        self._sel.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.net.peer", description=__doc__)
    p.add_argument("--netns", help="network namespace name (/run/netns/NAME) or path to enter")
    p.add_argument("--results", type=Path, required=True, help="results JSON path")
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"address to serve on ({DEFAULT_BIND})")
    p.add_argument("--bytes", type=int, default=64 << 20, help="TCP stream length each way")
    p.add_argument("--seed", type=lambda s: int(s, 0), default=DEFAULT_SEED)
    p.add_argument("--udp-count", type=int, default=1000)
    p.add_argument("--port-base", type=int, default=PORT_SINK,
                   help="sink; source +1, echo +2, UDP perf +3, TCP echo (RR) +4")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many s")
    p.add_argument("--linger", type=float, default=2.0, help="keep serving after all done")
    p.add_argument(
        "--expect",
        default=",".join(TESTS),
        help="comma-separated tests to wait for before exiting (default: all three)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    if args.netns:
        enter_netns(args.netns)
    base = args.port_base
    if not set(args.expect.split(",")) <= {"", *TESTS}:
        p.error(f"--expect takes names from {', '.join(TESTS)}")
    peer = Peer(
        args.results,
        bind=args.bind,
        nbytes=args.bytes,
        seed=args.seed,
        udp_count=args.udp_count,
        ports=(base, base + 1, base + 2),
        perf_ports=(base + 3, base + 4),
        timeout=args.timeout,
        linger=args.linger,
        expect=tuple(t for t in args.expect.split(",") if t),
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        peer.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        peer.open()
    except OSError as e:
        log.error("cannot listen on %s: %s", args.bind, e)
        peer.status = "error"
        peer.write_results()
        return 2 if e.errno != errno.EADDRINUSE else 3
    status = peer.run()
    return 0 if status == "done" else 1


if __name__ == "__main__":
    raise SystemExit(main())
