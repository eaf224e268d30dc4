"""``python -m harness.bench.wakeup``: what one wake-up of a sleeping thread costs on this host.

Our device makes wake-ups the built-in device does not: each doorbell wakes the device server
(a vfio-user message from a vCPU thread), and each interrupt wakes QEMU's main loop (an
eventfd), where QEMU's own device runs TX in the vCPU thread and injects from there. What a
wake-up costs is a property of the host, not of either device: on a virtual machine whose idle
CPUs halt into the hypervisor it is tens of microseconds, on bare metal a few
(docs/PERFORMANCE.md, round 14). ``harness bench net`` prints it with its table, so a TCP RR or
ping ratio can be read against it.

Two threads, each pinned to its own CPU, bounce an eventfd back and forth: every round trip is
two wake-ups of a thread blocked in ``epoll_wait``. The same with both on one CPU is the
floor (no cross-CPU wake-up at all). A third figure is what a ping pays: one wake-up, one way,
of a thread on the other CPU after both have slept ``IDLE`` (0.1 s, ping's interval); on a
virtual host an idle CPU's wake-up gets dearer the longer it slept (round 15).

The caller's own CPU affinity is left alone: QEMU and the
server inherit it. ``halt_poll_ns`` is the host's ``cpuidle-haltpoll`` window, if it has one
(how long an idle CPU polls before it halts: 0 makes every wake-up of an idle CPU an exit to
the hypervisor).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

__all__ = ["HALT_POLL", "Wakeup", "halt_poll_ns", "line", "main", "measure"]

HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
#: A thread that has waited this long for the other has lost it (it never blocks longer).
STALL = 2.0
#: The sleep before each after-idle wake-up (s), and how many of those are timed (2 s in all).
IDLE = 0.1
IDLE_ROUNDS = 20


class Wakeup(TypedDict):
    """Median us per wake-up, across two CPUs and on one, and one way across two CPUs after
    ``idle_ms`` asleep (None: fewer than two CPUs usable)."""

    cross_cpu_us: float | None
    same_cpu_us: float
    idle_cross_cpu_us: float | None
    idle_ms: float
    cpus: list[int]
    halt_poll_ns: int | None


def halt_poll_ns(path: Path = HALT_POLL) -> int | None:
    """The host's haltpoll window in ns, or None (no haltpoll driver, or unreadable)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _waiting_on(cpu: int, fd: int) -> select.epoll:
    """Pin the calling thread (only it) to ``cpu``; an epoll that waits for ``fd``."""
    os.sched_setaffinity(0, {cpu})
    ep = select.epoll()
    ep.register(fd, select.EPOLLIN)
    return ep


def _two_threads(first: Callable[[], None], second: Callable[[], None],
                 fds: tuple[int, ...]) -> None:
    """Run ``second`` and ``first`` in threads of their own (``second`` started first, so it is
    waiting when ``first`` posts), then close ``fds``; RuntimeError if either raised (an
    exception in a thread is reported here, not lost)."""
    failed: list[BaseException] = []

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:
                failed.append(exc)
        return run

    threads = [threading.Thread(target=guarded(f), daemon=True) for f in (second, first)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds:
        os.close(fd)
    if failed:
        raise RuntimeError(f"wake-up probe failed: {failed[0]}")


def _bounce(rounds: int, cpu_a: int, cpu_b: int) -> float:
    """Median us per wake-up of ``rounds`` round trips between threads on the two CPUs."""
    ping, pong = os.eventfd(0), os.eventfd(0)
    times: list[float] = []

    def side(cpu: int, wait_fd: int, post_fd: int, first: bool) -> None:
        ep = _waiting_on(cpu, wait_fd)
        for _ in range(rounds):
            t0 = time.perf_counter()
            if first:
                os.eventfd_write(post_fd, 1)
            if not ep.poll(STALL):
                raise TimeoutError("the other thread stopped answering")
            os.eventfd_read(wait_fd)
            if not first:
                os.eventfd_write(post_fd, 1)
            else:
                times.append(time.perf_counter() - t0)
        ep.close()

    _two_threads(lambda: side(cpu_a, pong, ping, True), lambda: side(cpu_b, ping, pong, False),
                 (ping, pong))
    return statistics.median(times) / 2 * 1e6  # two wake-ups per round trip


def _after_idle(rounds: int, cpu_a: int, cpu_b: int, idle: float) -> float:
    """Median us from a post on ``cpu_a`` to the wake-up of the thread on ``cpu_b``, each post
    made after ``idle`` seconds with both threads asleep (both clocks are CLOCK_MONOTONIC, so
    the two threads' readings compare)."""
    post, ack = os.eventfd(0), os.eventfd(0)
    sent: list[float] = []
    woke: list[float] = []

    def waker() -> None:
        ep = _waiting_on(cpu_a, ack)
        for _ in range(rounds):
            time.sleep(idle)
            sent.append(time.perf_counter())
            os.eventfd_write(post, 1)
            if not ep.poll(STALL):
                raise TimeoutError("the other thread stopped answering")
            os.eventfd_read(ack)
        ep.close()

    def sleeper() -> None:
        ep = _waiting_on(cpu_b, post)
        for _ in range(rounds):
            if not ep.poll(idle + STALL):
                raise TimeoutError("the other thread stopped posting")
            woke.append(time.perf_counter())
            os.eventfd_read(post)
            os.eventfd_write(ack, 1)
        ep.close()

    _two_threads(waker, sleeper, (post, ack))
    return statistics.median(w - s for s, w in zip(sent, woke, strict=True)) * 1e6


def measure(rounds: int = 2000, idle_rounds: int = IDLE_ROUNDS, idle: float = IDLE) -> Wakeup:
    """The three figures on the first two CPUs this process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    same = _bounce(rounds, cpus[0], cpus[0])
    cross = after = None
    if len(cpus) > 1:
        cross = _bounce(rounds, cpus[0], cpus[1])
        after = _after_idle(idle_rounds, cpus[0], cpus[1], idle)
    return Wakeup(cross_cpu_us=cross, same_cpu_us=same, idle_cross_cpu_us=after,
                  idle_ms=idle * 1e3, cpus=cpus[:2], halt_poll_ns=halt_poll_ns())


def line(w: Wakeup) -> str:
    """One line for a report."""
    cross = "n/a (one CPU)" if w["cross_cpu_us"] is None else f"{w['cross_cpu_us']:.1f} us"
    idle = ("" if w["idle_cross_cpu_us"] is None
            else f", {w['idle_cross_cpu_us']:.0f} us across after {w['idle_ms']:g} ms idle")
    poll = ("no haltpoll" if w["halt_poll_ns"] is None
            else f"haltpoll guest_halt_poll_ns={w['halt_poll_ns']}")
    return (f"host wake-up: {cross} across CPUs {w['cpus'][0]}/{w['cpus'][-1]}, "
            f"{w['same_cpu_us']:.1f} us on one{idle} ({poll})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench.wakeup",
                                description=__doc__.split("\n")[0].split(": ", 1)[-1])
    p.add_argument("--rounds", type=int, default=2000, help="round trips (default 2000)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 1_000_000:
        p.error("--rounds must be in 1..1000000")
    w = measure(args.rounds)
    print(json.dumps(w) if args.json else line(w))
    return 0


if __name__ == "__main__":
    sys.exit(main())
