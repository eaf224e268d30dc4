"""``python -m harness.bench.rrpath``: what one request/response transaction costs the server.

In one process, without QEMU: the real DeviceLoop serving the real VirtioNetDevice over the
DMA ledger (direct map ops on mock guest memory, harness.testing.mockdriver), with the two
edges as socket pairs so every wake-up goes through the selector as in the server:

- the "vfio-user socket": each byte the driver side sends is one doorbell (a TX kick);
- the "TAP": a SOCK_SEQPACKET pair carrying one frame per record, a real fd as a TAP's, so the
  device's C bursts (harness.virtio.fastpath) read and write it themselves, as in the server.

One transaction is what TCP_RR does to the device: the driver posts one TX frame and kicks
(it re-arms used_event for every completion, as Linux does while nothing is outstanding), the
loop takes one turn (the **TX wake-up**: message, TX flush, interrupt); the host's response
arrives, the loop takes one turn (the **RX wake-up**: frame into a pooled RX buffer, used
publish, interrupt); the driver reaps both and reposts an RX buffer (not timed).

The device runs the C bursts, as the server does (``--python``: the Python ring path, the
bursts' fallback and the reference they are checked against). Figures are us per wake-up and
per transaction (both wake-ups), median over ``--rounds`` rounds of ``--transactions`` each,
the garbage collector frozen while timing. They are the server's hot-cache floor for a
transaction: in a VM run the same path also pays the wake-up itself, cold caches and two cores
shared with TCG (docs/PERFORMANCE.md, round 6). ``--idle MS`` sleeps that long before each
transaction, as the server sleeps between two pings: the same path on cold caches (round 15:
10x the hot floor after 100 ms on a virtual host).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import struct
import sys
import time
from typing import TypedDict

from harness import argtypes
from harness.server.loop import DeviceLoop
from harness.testing.mockdriver import FdBackend, NetRig, net_rig
from harness.testing.serverfakes import FakeEndpoint

__all__ = ["main", "run"]

HDR = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)  # virtio_net_hdr_v1, nothing offloaded
RX_BUFFER = 1526
RX_POSTED = 64
#: Mock guest memory is a bump allocator: every posted buffer takes new room.
MEM_SIZE = 128 << 20
MAX_TRANSACTIONS = 50_000


class _Doorbells(FakeEndpoint):
    """The vfio-user socket: every byte received is one TX doorbell write."""

    def __init__(self, rig: NetRig) -> None:
        super().__init__()
        self.rig = rig

    def run(self) -> int:
        n = super().run()
        for _ in range(n):
            self.rig.tx.kick()
        return n


class Figures(TypedDict):
    """What one run measured (us), and on which path."""

    tx_wake_us: float
    rx_wake_us: float
    transaction_us: float
    path: str
    idle_ms: float


def run(transactions: int = 2000, rounds: int = 5, bursts: bool = True,
        idle: float = 0.0) -> Figures:
    """Median us per TX wake-up, per RX wake-up and per transaction, with the C bursts (or
    the Python path), the process asleep ``idle`` seconds before each timed transaction;
    raises RuntimeError if a frame went missing or the path was not the one asked for (the
    figures would then not be of the path they name)."""
    tap = FdBackend()  # the TAP: a real fd the loop polls and the bursts read and write
    rig = net_rig(mem_size=MEM_SIZE, ledger=True, backend=tap, bursts=bursts)
    assert rig.ledger is not None
    if (rig.device.fastpath is not None) != bursts:
        raise RuntimeError(f"the C bursts are {'off' if bursts else 'on'}")
    path = "C bursts" if rig.device.fastpath is not None else "Python path"
    bell = _Doorbells(rig)
    sent = 0
    # The device's own ledger is the loop's too, as in the server: its per-turn housekeeping
    # is part of every wake-up.
    loop = DeviceLoop(bell, rig.device, rig.ledger, tap, idle_timeout=0.01)
    try:
        bell.attach()
        loop.connected()
        for _ in range(RX_POSTED):
            rig.rx.add(in_=[RX_BUFFER])
        rig.rx.kick()
        loop.run_once()
        response = HDR + rig.device.mac + bytes(60)
        request = HDR + bytes(60)
        tx_wake: list[float] = []
        rx_wake: list[float] = []
        clock = time.perf_counter

        def transaction(t: list[float]) -> None:
            rig.tx.set_used_event(rig.tx.last_used)
            rig.rx.set_used_event(rig.rx.last_used)
            rig.tx.add([request])
            if rig.tx.kick_needed():
                bell.peer.send(b"k")
            rig.tx.kicked_at = rig.tx.avail_idx
            if idle:
                time.sleep(idle)
            t0 = clock()
            loop.run_once()
            t1 = clock()
            tap.deliver(response)
            t2 = clock()
            loop.run_once()
            t3 = clock()
            t[0] += t1 - t0
            t[1] += t3 - t2
            nonlocal sent
            sent += len(tap.frames())
            rig.tx.get_used()
            rig.rx.get_used()
            rig.rx.add(in_=[RX_BUFFER])
            rig.rx.kick_if_needed()

        warmup = min(200, transactions)
        for _ in range(warmup):
            transaction([0.0, 0.0])  # the idle sleeps too: a cold path stays cold
        gc.collect()
        gc.freeze()
        try:
            for _ in range(rounds):
                t = [0.0, 0.0]
                for _ in range(transactions):
                    transaction(t)
                tx_wake.append(t[0] / transactions * 1e6)
                rx_wake.append(t[1] / transactions * 1e6)
        finally:
            gc.unfreeze()
        done = warmup + rounds * transactions
        got = rig.device.queues[0].stats.packets
        if sent != done or got != done:
            raise RuntimeError(f"{done} transactions, {sent} frames sent and {got} received")
    finally:
        loop.close()
        tap.close()
        bell.close()
    tx, rx = statistics.median(tx_wake), statistics.median(rx_wake)
    return Figures(tx_wake_us=round(tx, 2), rx_wake_us=round(rx, 2),
                   transaction_us=round(tx + rx, 2), path=path, idle_ms=idle * 1e3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench.rrpath",
                                description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--transactions", type=argtypes.positive_int, default=None, metavar="N",
                   help="transactions per round (default 2000; 30 with --idle)")
    p.add_argument("--rounds", type=argtypes.positive_int, default=None,
                   help="rounds (default 5, 3 with --idle; median)")
    p.add_argument("--python", action="store_true",
                   help="the Python ring path instead of the C bursts (the server's default)")
    p.add_argument("--idle", type=argtypes.nonnegative_int, default=0, metavar="MS",
                   help="sleep this long before each transaction, as a server between two "
                        "pings does (the path on cold caches; default 0: back to back)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    args = p.parse_args(argv)
    if args.idle > 1000:
        p.error("--idle is at most 1000 ms")
    # Each transaction sleeps --idle first (warm-up ones too): keep the default run short.
    if args.transactions is None:
        args.transactions = 30 if args.idle else 2000
    if args.rounds is None:
        args.rounds = 3 if args.idle else 5
    if args.transactions * (args.rounds + 1) > MAX_TRANSACTIONS:
        p.error(f"at most {MAX_TRANSACTIONS} transactions in all (mock guest memory)")
    res = run(args.transactions, args.rounds, bursts=not args.python, idle=args.idle / 1e3)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"per transaction {res['transaction_us']:.1f} us: TX wake-up "
              f"{res['tx_wake_us']:.1f} us, RX wake-up {res['rx_wake_us']:.1f} us "
              f"(median of {args.rounds} x {args.transactions}, {res['path']}"
              + (f", {args.idle:g} ms asleep before each)" if args.idle else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
