"""The `harness` command: argument parsing and dispatch, nothing else.

Subcommands: `vm-test` (the end-to-end run), `run` (boot and keep running, the guest's shell
here), `qmp` (a QMP shell on the running VM), `stats` and `dump-queue` (the running device's
counters and rings), `link` (set its link up or down), `announce` (ask the guest to announce
itself), `serve` (the device server alone),
`accel` (which accelerator auto would pick, and why), `bench iova`, `bench net`, `fuzz`
(seeded in-guest fuzzing, harness.fuzz). Bad input
is an argparse error (exit 2) with a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from harness import argtypes, proc


def _add_testbed_options(p: argparse.ArgumentParser) -> None:
    """What shapes a testbed: shared by vm-test and run."""
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="auto probes whether KVM can run the guest and falls back to TCG")
    p.add_argument("--map-ops", choices=["direct", "bounce"], default="direct",
                   help="direct: zero-copy views of guest memory; bounce: the device sees only "
                        "bounce buffers, copied at the sync points")
    p.add_argument("--faults", type=argtypes.fault_spec, metavar="SPEC",
                   help="inject faults into the map ops, e.g. mapping-error=0.01,"
                        "iova-alloc=0.05,max-mapping-size=4096,seed=7")
    p.add_argument("--viommu", action="store_true", help="put the device behind an intel-iommu")
    p.add_argument("--offloads", action="store_true",
                   help="offer checksum and TSO offloads (CSUM, GUEST_CSUM, HOST/GUEST_TSO4/6; "
                        "on by default now: the same as --features offloads=on)")
    p.add_argument("--features", type=_features_spec, default="", metavar="NAME=on|off,...",
                   help="device feature switches over the defaults, like QEMU device "
                        "properties: csum, guest_csum, host_tso4/6, guest_tso4/6, mrg_rxbuf, "
                        "event_idx, indirect, status, mac, ring_reset, offloads (all on by "
                        "default), mtu=N, mq=N (1..4 queue pairs), packed (packed "
                        "virtqueues), ctrl_vq, ctrl_rx, ctrl_rx_extra, ctrl_mac_addr, "
                        "guest_announce (on with ctrl_vq) (these off by default)")
    p.add_argument("--smp", type=argtypes.positive_int, default=2)
    p.add_argument("--memory", type=argtypes.memory_mb, default=512, metavar="MB")
    p.add_argument("--pcap", type=Path, metavar="FILE",
                   help="write every frame the device moves to FILE (pcapng, both directions)")
    p.add_argument("--kernel", type=Path, metavar="PATH",
                   help="the guest kernel under test: a bzImage, a kernel build tree, a "
                        "/lib/modules/<version> tree, or debian:6.1 / debian:6.12 (that "
                        "suite's current kernel; default: the pinned Debian 7.3 kernel)")
    p.add_argument("--append", default="", metavar="ARGS",
                   help="extra guest kernel command-line words")
    p.add_argument("--initrd-add", type=Path, metavar="DIR",
                   help="add DIR's files to the initramfs at the same relative paths")
    p.add_argument("--misbehave", type=_misbehave_spec, action="append", default=[],
                   metavar="CASE[:after=N][:queue=Q][:always]",
                   help="make the device break the virtio spec in this named way (repeatable "
                        "or a comma list; `harness misbehave --list` names the cases)")
    p.add_argument("--qemu-trace", type=_trace_events, action="append", default=[],
                   metavar="EVENT,...",
                   help="enable QEMU trace events (names or globs, e.g. vfio_user_dma_*,"
                        "vtd_inv_*; repeatable), logged with timestamps to the run's "
                        "qemu.log; `qemu-system-x86_64 -trace help` lists them")
    p.add_argument("--boot", choices=("auto", "pvh", "bzimage"), default="auto",
                   help="auto: boot the kernel through its PVH entry (the bzImage's own "
                        "vmlinux, unpacked once and cached: 2-3 s less per boot under TCG) "
                        "when it has one, else the bzImage; pvh: that or an error; bzimage: "
                        "always through the kernel's own decompressor")


def _trace_events(text: str) -> tuple[str, ...]:
    from harness.vm.qemu import TRACE_EVENT

    events = tuple(e.strip() for e in text.split(",") if e.strip())
    bad = [e for e in events if not TRACE_EVENT.fullmatch(e)]
    if bad or not events:
        raise argparse.ArgumentTypeError(
            f"not QEMU trace event names or patterns: {text!r} (e.g. vfio_user_*,vtd_inv_*)")
    return events


def _flat(groups: list[tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(e for g in groups for e in g)


def _features_spec(text: str) -> str:
    from harness.virtio.features import parse

    try:
        parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _misbehave_spec(text: str) -> str:
    from harness.virtio.misbehave import spec_list

    return spec_list(text)


def _add_vm_test(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vm-test", help="boot a guest against the device and run its test plan")
    _add_testbed_options(p)
    p.add_argument("--tcp-bytes", type=argtypes.size, default=64 << 20, metavar="SIZE")
    p.add_argument("--udp-count", type=argtypes.positive_int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=argtypes.seconds, default=900.0, metavar="SECONDS",
                   help="how long the guest's plan may take (default 900)")
    p.add_argument("--boot-timeout", type=argtypes.seconds, default=120.0, metavar="SECONDS",
                   help="how long from QEMU's start to /init's first line before the boot "
                        "counts as stalled and QEMU's vCPU state is reported (default 120)")
    p.add_argument("--out", type=Path, help="parent directory for run logs (default build/vm-test)")
    p.add_argument("--junit", type=Path, help="JUnit XML path (default <run dir>/junit.xml)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--allow-warnings", action="store_true",
                   help="kernel WARNINGs on the console pass (their excerpt is kept)")


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="boot the guest with the device and keep it running, "
                                   "with its shell on this terminal")
    _add_testbed_options(p)
    p.add_argument("--console", choices=["terminal", "socket"], default="terminal",
                   help="terminal: the guest's shell here; socket: on console.sock in the "
                        "run directory (connect with socat)")
    p.add_argument("--hotplug-ports", type=argtypes.nonnegative_int, default=1, metavar="N",
                   help="free pcie-root-ports hp0.. for device_add (default 1)")
    p.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                   help="no terminal: once the link is up, run CMD in the guest (sh -c, over "
                        "the guest agent's serial port), print its output, stop everything and "
                        "exit with its status (124: it timed out, 125: it could not be run)")
    p.add_argument("--exec-timeout", type=argtypes.seconds, default=600.0, metavar="SECONDS",
                   help="how long --exec's command may run (default 600)")


def _add_run_client(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                    help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--run-dir", type=Path,
                   help="the run's directory (default: the newest running `harness run`)")
    return p


def cmd_vm_test(args: argparse.Namespace) -> int:
    from harness import paths
    from harness.guest.kernel import KernelError
    from harness.report import summary, write_junit
    from harness.runner import VmTestConfig, run_vm_test
    from harness.testbed import TestbedError

    cfg = VmTestConfig(accel=args.accel, map_ops=args.map_ops, viommu=args.viommu,
                       faults=args.faults, offloads=args.offloads or None,
                       features=args.features, smp=args.smp, memory_mb=args.memory,
                       tcp_bytes=args.tcp_bytes,
                       udp_count=args.udp_count, seed=args.seed, timeout=args.timeout,
                       boot_timeout=args.boot_timeout,
                       out_dir=args.out, pcap=args.pcap, kernel=args.kernel,
                       append=tuple(args.append.split()), initrd_add=args.initrd_add,
                       allow_warnings=args.allow_warnings, misbehave=tuple(args.misbehave),
                       qemu_trace=_flat(args.qemu_trace), boot=args.boot)
    try:
        with proc.interrupts():
            result = run_vm_test(cfg)
    except (paths.EnvError, KernelError, TestbedError) as exc:
        print(f"harness vm-test: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return proc.report_interrupted("harness vm-test", exc)
    junit = args.junit or Path(result.run_dir) / "junit.xml"
    write_junit(result, junit)
    print(result.to_json() if args.json else summary(result))
    if not args.json:
        print(f"JUnit XML: {junit}")
    return 0 if result.ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    from harness import paths
    from harness.guest.kernel import KernelError
    from harness.session import run_session
    from harness.testbed import PeerSpec, TestbedConfig, TestbedError

    cfg = TestbedConfig(accel=args.accel, map_ops=args.map_ops, viommu=args.viommu,
                        faults=args.faults, offloads=args.offloads or None,
                        features=args.features, smp=args.smp,
                        memory_mb=args.memory, pcap=args.pcap,
                        hotplug_ports=args.hotplug_ports, kernel=args.kernel,
                        append=tuple(args.append.split()), initrd_add=args.initrd_add,
                        misbehave=tuple(args.misbehave), qemu_trace=_flat(args.qemu_trace),
                        boot=args.boot,
                        # The peers serve the guest's own hnet tests for as long as it runs.
                        peers=PeerSpec(timeout=30 * 24 * 3600.0))
    try:
        with proc.interrupts():
            return run_session(cfg, args.console, args.exec_cmd, args.exec_timeout)
    except (paths.EnvError, KernelError, TestbedError) as exc:
        print(f"harness run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return proc.report_interrupted("harness run", exc)


def cmd_qmp(args: argparse.Namespace) -> int:
    from harness import qmpshell
    from harness.session import find_run

    try:
        run = find_run(args.run_dir)
    except LookupError as exc:
        print(f"harness qmp: {exc}", file=sys.stderr)
        return 2
    return qmpshell.main(Path(run.qmp), set(run.devices), args.words, force=args.force)


def cmd_hotplug(args: argparse.Namespace) -> int:
    from harness.session import find_run, request

    try:
        reply = request(find_run(args.run_dir), "hotplug")
    except (LookupError, OSError, ValueError) as exc:
        print(f"harness hotplug: {exc}", file=sys.stderr)
        return 2
    if not reply.get("ok"):
        print(f"harness hotplug: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"added {reply['device']} (MAC {reply['mac']}); in the guest: "
          f"ip addr add {reply['guest']} dev ethN; host side {reply['host']}")
    return 0


def _add_inspect_client(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                        help_text: str) -> argparse.ArgumentParser:
    p = _add_run_client(sub, name, help_text)
    p.add_argument("--device", default="net0",
                   help="which device server of the run (default net0)")
    p.add_argument("--json", action="store_true", help="print the server's reply as JSON")
    return p


def cmd_stats(args: argparse.Namespace) -> int:
    from harness import inspect

    try:
        return inspect.stats(args.run_dir, args.device, as_json=args.json, watch=args.watch)
    except inspect.InspectError as exc:
        print(f"harness stats: {exc}", file=sys.stderr)
        return 2


def cmd_dump_queue(args: argparse.Namespace) -> int:
    from harness import inspect

    try:
        return inspect.dump_queue(args.run_dir, args.device, args.queue, as_json=args.json)
    except inspect.InspectError as exc:
        print(f"harness dump-queue: {exc}", file=sys.stderr)
        return 2


def cmd_link(args: argparse.Namespace) -> int:
    from harness import inspect

    try:
        return inspect.link(args.run_dir, args.device, args.state == "up", as_json=args.json)
    except inspect.InspectError as exc:
        print(f"harness link: {exc}", file=sys.stderr)
        return 2


def cmd_announce(args: argparse.Namespace) -> int:
    from harness import inspect

    try:
        return inspect.announce(args.run_dir, args.device, as_json=args.json)
    except inspect.InspectError as exc:
        print(f"harness announce: {exc}", file=sys.stderr)
        return 2


def cmd_accel(args: argparse.Namespace) -> int:
    from harness import paths
    from harness.testbed import select_accel

    try:
        env = paths.load_env()
        choice = select_accel(args.accel, env)
    except (paths.EnvError, ValueError) as exc:
        print(f"harness accel: {exc}", file=sys.stderr)
        return 2
    print(f"{choice.name}: {choice.reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_vm_test(sub)
    _add_run(sub)
    p = _add_run_client(sub, "qmp", "QMP shell on the running VM (one command if given)")
    p.add_argument("--force", action="store_true",
                   help="send commands the shell refuses (device_del of a vfio-user device)")
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND [ARG=VALUE ...]")
    _add_run_client(sub, "hotplug", "hot-add a second device (its own server) to the "
                                    "running VM")
    p = _add_inspect_client(sub, "stats", "the running device's counters: queues, "
                                         "interrupts, map ops, ledger, IOVA space")
    p.add_argument("--watch", nargs="?", type=argtypes.seconds, const=2.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p = _add_inspect_client(sub, "dump-queue", "decode one virtqueue of the running device: "
                                              "descriptors, rings, chains in flight")
    p.add_argument("queue", type=argtypes.nonnegative_int, metavar="N",
                   help="queue index (0 rx0, 1 tx0)")
    p = _add_inspect_client(sub, "link", "set the running device's link up or down (the "
                                        "guest sees carrier change)")
    p.add_argument("state", choices=["up", "down"])
    _add_inspect_client(sub, "announce", "ask the running guest to announce itself "
                                         "(VIRTIO_NET_F_GUEST_ANNOUNCE: gratuitous ARPs)")
    p = sub.add_parser("accel", help="say which accelerator auto picks, and why")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    sub.add_parser("serve", help="run the device server alone (see `harness serve --help`)",
                   add_help=False)
    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("what", choices=["iova", "net"])
    sub.add_parser("misbehave", help="run the misbehaving-device catalogue against a guest "
                   "kernel (see `harness misbehave --help`)", add_help=False)
    sub.add_parser("fuzz", help="seeded in-guest fuzzing of the device through the raw "
                   "driver (see `harness fuzz --help`)", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "misbehave":
        from harness.misbehave_run import main as misbehave_main

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        return misbehave_main(argv[1:])
    if argv and argv[0] == "fuzz":
        from harness.fuzz import main as fuzz_main

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        return fuzz_main(argv[1:])
    # serve and bench pass their own options through to their own parsers.
    if argv and argv[0] == "serve":
        from harness.server import main as serve_main

        return serve_main(argv[1:])
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] == "iova":
        from harness.bench.iova import main as bench_iova

        return bench_iova(argv[2:])
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] == "net":
        from harness.bench.net import main as bench_net

        return bench_net(argv[2:])
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "vm-test":
        return cmd_vm_test(args)
    if args.command == "accel":
        return cmd_accel(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "qmp":
        return cmd_qmp(args)
    if args.command == "hotplug":
        return cmd_hotplug(args)
    if args.command == "stats":
        return cmd_stats(args)
    if args.command == "dump-queue":
        return cmd_dump_queue(args)
    if args.command == "link":
        return cmd_link(args)
    if args.command == "announce":
        return cmd_announce(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
