"""One round of ``harness bench net``: boot one side, run every workload in the guest, measure.

A side is ``ours`` (our device server), ``ours-noledger`` (the same with the DMA ledger a
pass-through, HARNESS_LEDGER=off, to price the checks), ``ours-ab`` (ours with ``--ab``'s
environment: the B of a paired A/B) or ``builtin`` (QEMU's own virtio-net-pci on a TAP
without vhost). The guest boots to a shell (no plan); each workload is
one ``hnet``/``ping`` command run through the guest command channel, which does not depend on
the device under test. Around each command the device server's and QEMU's CPU time are read
from their CPU-time clocks (nanoseconds, all threads), so every workload gets its own CPU
cost per packet, per MiB or per ping.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import knobs, paths, proc

__all__ = ["COMMANDS", "Options", "Round", "cpu_ns", "parse_metrics", "parse_ping",
           "per_unit", "run_round"]

MIB = 1 << 20
HOST = "198.18.0.1"
PORT_SINK, PORT_SOURCE, PORT_UDP_PERF, PORT_RR = 5001, 5002, 5004, 5005
SEED = 1


@dataclass(frozen=True)
class Options:
    rounds: int = 3
    nbytes: int = 16 * MIB
    seconds: float = 2.0
    udp_size: int = 64
    rr_size: int = 1
    rate: int = 50_000
    pings: int = 20
    configs: tuple[str, ...] = ("plain",)
    ledger_side: bool = True
    accel: str = "auto"
    timeout: float = 900.0
    out: Path | None = None
    #: Record the ours side's device server with py-spy per workload (collapsed stacks here).
    profile: Path | None = None
    #: Environment of the ``ours-ab`` side's device server (a paired A/B of a server knob).
    ab_env: tuple[tuple[str, str], ...] = ()
    #: Extra guest kernel command-line words, the same on every side (e.g. iommu.strict=0).
    append: tuple[str, ...] = ()


#: config name -> (offloads, viommu)
CONFIGS = {"plain": (False, False), "offloads": (True, False), "viommu": (False, True),
           "viommu+offloads": (True, True)}


@dataclass
class Round:
    """One boot of one side in one config: numbers by workload name, or why there are none."""

    side: str
    index: int
    config: str = "plain"
    run_dir: str = ""
    values: dict[str, float] = field(default_factory=dict)
    #: workload -> {"server": CPU per unit, "qemu": CPU per unit} (unit: see WORKLOADS)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the device server's DMA_MAP/UNMAP latency summaries (ours sides only)
    dma_latency: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    #: The network device as QEMU's query-pci saw it (driver, ids): which device really ran.
    device: dict[str, Any] = field(default_factory=dict)


def parse_metrics(text: str) -> dict[str, float]:
    """hnet's one ``key=value ...`` stdout line: the numeric values by key."""
    out: dict[str, float] = {}
    for key, value in re.findall(r"(\w+)=(\S+)", text):
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


_PING = re.compile(r"min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")


def parse_ping(text: str) -> float | None:
    """busybox ping's average round-trip time in ms, None if it printed no summary."""
    m = _PING.search(text)
    return float(m.group(2)) if m else None


def cpu_ns(pid: int | None) -> int | None:
    """CPU time of a live process, all its threads (ended ones too), in nanoseconds; None if
    it is gone.

    Read from the process's CPU-time clock (the clock id Linux derives from a pid, as
    clock_getcpuclockid(3) does): exact, where /proc/<pid>/stat counts 10 ms ticks, and a
    ping costs the server well under one tick, 16 MiB with offloads about one.
    """
    if pid is None:
        return None
    try:
        return time.clock_gettime_ns(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:  # EINVAL: no such process
        return None


#: The per-process scheduler CPU clock in Linux's encoding of pid clock ids (posix-timers.h).
_CPUCLOCK_SCHED = 2


def per_unit(ns: int, units: float, scale: float) -> float | None:
    """``ns`` nanoseconds of CPU per unit moved, in ms * ``scale`` (None: no units)."""
    if units <= 0:
        return None
    return ns / 1e6 * scale / units


@dataclass(frozen=True)
class Command:
    """One workload's guest command: what to run, which metric is the result, what the CPU
    time is divided by (a metric name, or ``bytes`` for the stream length) and its scale."""

    build: Callable[[Options], str]
    metric: str
    per: str
    scale: float  # 1.0: ms per unit (per MiB); 1000.0: us per unit (per packet)


def _hnet(cmd: str, port: int, extra: str) -> Callable[[Options], str]:
    return lambda o: f"hnet {cmd} --host {HOST} --port {port} {extra.format(o=o)}"


COMMANDS: dict[str, Command] = {
    "tcp_guest_to_host": Command(_hnet("tcp-send", PORT_SINK, f"--bytes {{o.nbytes}} --seed "
                                       f"{SEED}"), "mbps", "bytes", 1.0),
    "tcp_host_to_guest": Command(_hnet("tcp-recv", PORT_SOURCE, f"--bytes {{o.nbytes}} --seed "
                                       f"{SEED}"), "mbps", "bytes", 1.0),
    "udp_pps_guest_to_host": Command(_hnet("udp-tx", PORT_UDP_PERF,
                                           "--size {o.udp_size} --seconds {o.seconds}"),
                                     "pps", "received", 1000.0),
    "udp_pps_host_to_guest": Command(_hnet("udp-rx", PORT_UDP_PERF,
                                           "--size {o.udp_size} --seconds {o.seconds} "
                                           "--rate {o.rate}"), "pps", "received", 1000.0),
    "tcp_rr": Command(_hnet("tcp-rr", PORT_RR, "--size {o.rr_size} --seconds {o.seconds}"),
                      "tps", "transactions", 1000.0),
    "ping_rtt": Command(lambda o: f"ping -c {o.pings} -i 0.1 {HOST}", "rtt", "pings", 1000.0),
}


def _pci_device(reply: object, qdev_id: str = "net0") -> dict[str, Any]:
    """The query-pci entry of the network device: its ids, class and QEMU's description."""
    for bus in reply if isinstance(reply, list) else []:
        for dev in bus.get("devices", []):
            if dev.get("qdev_id") == qdev_id:
                ids = dev.get("id", {})
                return {"qdev_id": qdev_id, "description": dev.get("class_info", {}).get("desc"),
                        **{k: f"{v:#06x}" for k, v in ids.items() if isinstance(v, int)}}
    return {}


def py_spy() -> str | None:
    """The py-spy next to this Python (the venv's), else on PATH; None if not installed."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _profiler(pid: int | None, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling ``pid`` into ``out`` (collapsed stacks) until SIGINT; None without it."""
    exe = py_spy()
    if exe is None or pid is None:
        return None
    # --nonblocking: the device is not paused per sample (the figures stay comparable).
    return proc.popen([exe, "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
                       "--format", "raw", "--output", str(out)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_profiler(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def _measure(tb: Any, name: str, cmd: Command, opts: Options, pids: dict[str, int | None],
             rnd: Round) -> str | None:
    """Run one workload in the guest; record its result and CPU costs; the failure, if any."""
    line = cmd.build(opts)
    spy = None
    if opts.profile is not None and rnd.side in ("ours", "ours-ab"):
        # Both sides of an A/B, so the profile of the old way is taken in the same run.
        opts.profile.mkdir(parents=True, exist_ok=True)
        ab = "-ab" if rnd.side == "ours-ab" else ""
        spy = _profiler(pids.get("server"), opts.profile / f"{rnd.config}-{rnd.index:02d}{ab}-"
                                                          f"{name}.txt")
    before = {k: cpu_ns(p) for k, p in pids.items()}
    try:
        res = tb.guest.run(line, timeout=opts.seconds + 120 + opts.nbytes / MIB)
    finally:
        after = {k: cpu_ns(p) for k, p in pids.items()}
        _stop_profiler(spy)
    if name == "ping_rtt":
        rtt = parse_ping(res.stdout.decode(errors="replace"))
        if rtt is None:
            return f"{name}: no ping summary (exit {res.returncode})"
        rnd.values[name] = rtt
        units = float(opts.pings)
    else:
        metrics = parse_metrics(res.stdout.decode(errors="replace"))
        if res.returncode != 0 or cmd.metric not in metrics:
            why = res.stderr.decode(errors="replace").strip().splitlines()
            return f"{name}: {why[0] if why else f'exit {res.returncode}'}"
        rnd.values[name] = metrics[cmd.metric]
        units = opts.nbytes / MIB if cmd.per == "bytes" else metrics.get(cmd.per, 0.0)
    costs = {}
    for key in pids:
        a, b = before[key], after[key]
        if a is not None and b is not None:
            cost = per_unit(b - a, units, cmd.scale)
            if cost is not None:
                costs[key] = cost
    rnd.cpu[name] = costs
    return None


def run_round(side: str, index: int, config: str, opts: Options, run_dir: Path,
              env: paths.Env, accel: Any) -> Round:
    """Boot ``side`` in ``config``, run every workload, shut down; the round's numbers."""
    from harness.dma.factory import LEDGER_ENV
    from harness.testbed import SHELL_CMDLINE, PeerSpec, Testbed, TestbedConfig

    offloads, viommu = CONFIGS[config]
    rnd = Round(side, index, config, str(run_dir))
    cfg = TestbedConfig(accel=opts.accel, viommu=viommu, offloads=offloads,
                        device="builtin" if side == "builtin" else "ours",
                        peers=PeerSpec(tcp_bytes=opts.nbytes, udp_count=1),
                        cmdline=SHELL_CMDLINE, append=opts.append)
    failed: list[str] = []
    # The device server inherits the environment: only the ledger-off side turns the ledger
    # off, only the A/B side gets the knobs under test.
    env_vars = {LEDGER_ENV: "off" if side == "ours-noledger" else "on"}
    if side == "ours-ab":
        env_vars.update(opts.ab_env)
    with knobs.environment(env_vars), Testbed(cfg, run_dir, env=env, accel=accel) as tb:
        ours = side != "builtin"
        pids = {"qemu": tb.machine.pid, "server": tb.device.proc.pid if ours else None}
        if not ours:
            del pids["server"]
        rnd.device = _pci_device(tb.qmp("query-pci"))
        rnd.device["type"] = tb.qmp("qom-get", path="/machine/peripheral/net0",
                                    property="type")
        tb.wait_shell(min(opts.timeout, 300.0))
        deadline = time.monotonic() + opts.timeout
        for name, cmd in COMMANDS.items():
            if time.monotonic() > deadline:
                failed.append(f"{name}: round timeout ({opts.timeout:.0f} s)")
                break
            why = _measure(tb, name, cmd, opts, pids, rnd)
            if why:
                failed.append(why)
            tb.check_alive()
        stats_path = tb.device.stats_path if ours else None
    if stats_path is not None:
        try:
            stats = json.loads(stats_path.read_text())
            rnd.dma_latency = stats.get("vfio_user", {}).get("dma_latency", {})
        except (OSError, ValueError):
            failed.append("no device stats")
    rnd.error = "; ".join(failed)
    return rnd
