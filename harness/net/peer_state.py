"""The host peer's plan and records: what :mod:`harness.net.peer` serves and writes down.

The default ports, the bind address, the stream seed and block size, the tests' names (the
guest's KTAP names) and the results version; the per-test records of the results JSON
(:class:`TcpResult`, :class:`UdpResult`); and the per-connection state of the TCP sink and
source (``_Sink``, ``_Source``). Data only: the servers are :class:`harness.net.peer.Peer`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

PORT_SINK = 5001
PORT_SOURCE = 5002
PORT_ECHO = 5003
PORT_UDP_PERF = 5004  # port base + 3
PORT_RR = 5005  # port base + 4
DEFAULT_BIND = "198.18.0.1"
DEFAULT_SEED = 1  # guest/init's default harness.seed
CHUNK = 1 << 20  # verify/generate in 1 MiB blocks: numpy call overhead stays negligible
RESULTS_VERSION = 1
TESTS = ("tcp_guest_to_host", "tcp_host_to_guest", "udp_mixed")  # names match the guest's KTAP


@dataclass
class TcpResult:
    """Outcome of one TCP direction (the last connection that finished)."""

    state: str = "pending"  # pending | running | done
    ok: bool | None = None
    bytes: int = 0
    seconds: float = 0.0
    mbps: float = 0.0
    first_mismatch: int | None = None
    error: str | None = None
    connections: int = 0


@dataclass
class UdpResult:
    """Outcome of the UDP echo test."""

    state: str = "pending"
    ok: bool | None = None
    good: int = 0
    bad: int = 0
    dup: int = 0
    bytes: int = 0
    seconds: float = 0.0
    first_bad: int | None = None  # schedule index expected when the first bad datagram came


@dataclass
class _Sink:
    sock: socket.socket
    t0: float
    buf: bytearray = field(default_factory=lambda: bytearray(CHUNK))
    fill: int = 0
    offset: int = 0  # stream offset of buf[0]
    mismatch: int | None = None
    why: str = ""


@dataclass
class _Source:
    sock: socket.socket
    t0: float
    sent: int = 0
    pending: memoryview = field(default_factory=lambda: memoryview(b""))
    finished_sending: bool = False
