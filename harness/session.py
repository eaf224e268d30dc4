"""`harness run`: boot the testbed and keep it running, with the guest's shell on this terminal.

The run directory (build/run/<stamp>, `latest` points at the newest) holds the logs, the
sockets and `run.json`, which says where everything is while the run lives; `harness qmp`,
`harness stats` and `harness dump-queue` find the running VM through it. The console is
relayed between the terminal and QEMU's console socket with the terminal in cbreak mode:
keys go to the guest one by one (its shell echoes and edits), while Ctrl-C stays a signal that
tears everything down. `exit` in the guest's shell powers the guest off, which ends the run too.

`harness run --exec CMD` is the same run without a person: once the guest's plan has brought
the link up, CMD runs in the guest through the guest command channel (harness.guest.agent),
its stdout and stderr are copied here, everything is torn down, and its exit status is ours.
Its request socket is served from a thread meanwhile, so a script can `harness hotplug` into
the run while CMD runs (a hot-add under the guest's own test).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness import paths
from harness.guest.agent import AgentError
from harness.testbed import SHELL_CMDLINE, Testbed, TestbedConfig
from harness.vm import ktap

RUN_FILE = "run.json"
#: The run process's own requests socket (`harness hotplug` talks to it), in the run dir.
RUN_SOCKET = "harness.sock"


def request(run: RunInfo, cmd: str, timeout: float = 60.0) -> dict[str, object]:
    """Send one request to a live run's process (see RunRequests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(Path(run.run_dir) / RUN_SOCKET))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    return reply if isinstance(reply, dict) else {"ok": False, "error": "bad reply"}


@dataclass(frozen=True)
class RunInfo:
    """What run.json says about a live `harness run`."""

    pid: int
    run_dir: str
    qmp: str  # the QMP monitor for people
    control: list[str]  # each device server's control socket, net0 first
    devices: list[str]  # the QEMU ids of the vfio-user-pci devices
    console_socket: str
    console_log: str

    def write(self) -> None:
        path = Path(self.run_dir) / RUN_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)


def runs_root() -> Path:
    return paths.build_dir() / "run"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_run(run_dir: Path) -> RunInfo:
    """The run in run_dir; LookupError (with the reason) if it is not running."""
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
        info = RunInfo(**data)
    except FileNotFoundError:
        raise LookupError(f"{run_dir} has no {RUN_FILE}: not a harness run directory, or "
                          "the run has ended") from None
    except (ValueError, TypeError) as exc:
        raise LookupError(f"{run_dir / RUN_FILE} is unreadable: {exc}") from None
    if not _alive(info.pid):
        raise LookupError(f"the run in {run_dir} has ended (pid {info.pid} is gone)")
    return info


def find_run(run_dir: Path | None = None) -> RunInfo:
    """The given run, or the newest live one under build/run; LookupError if none."""
    if run_dir is not None:
        return load_run(run_dir)
    candidates = sorted(runs_root().glob(f"*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime,
                        reverse=True)
    for path in candidates:
        with contextlib.suppress(LookupError):
            return load_run(path.parent)
    raise LookupError("no running VM found (start one with `harness run`, or pass --run-dir)")


def run_info(tb: Testbed) -> RunInfo:
    assert tb.console_socket is not None
    return RunInfo(pid=os.getpid(), run_dir=str(tb.run_dir), qmp=str(tb.user_qmp_socket),
                   control=[str(d.control) for d in tb.devices],
                   devices=[d.spec.name for d in tb.devices],
                   console_socket=str(tb.console_socket), console_log=str(tb.console_log))


def banner(tb: Testbed, info: RunInfo, console: str) -> str:
    """Where everything is, in lines that fit 80 columns (paths may be longer)."""
    env = tb.env
    lines = [
        f"harness run: accel {tb.accel.name}, QEMU {env.qemu_version}, "
        f"kernel {env.kernel_version}",
        f"  run dir  {info.run_dir}",
        f"  QMP      harness qmp        ({info.qmp})",
        f"  device   harness stats, harness dump-queue N   ({info.control[0]})",
        "  hot-add  harness hotplug    (one more device, with its own server)",
        "  link     harness link down|up   (the device's link state, as the guest sees it)",
        "  logs     console.log, net0-server.log, qemu.log in the run dir",
    ]
    if console == "socket":
        lines.append(f"  console  socat -,raw,echo=0 UNIX-CONNECT:{info.console_socket}")
        lines.append("  stop     Ctrl-C or SIGTERM here, or poweroff -f in the guest")
    else:
        lines.append("  console  this terminal: the guest's shell (`exit` powers it off)")
        lines.append("  stop     Ctrl-C, or `exit` in the guest")
    return "\n".join(lines)


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """Keys go out one at a time without local echo; Ctrl-C is still a signal here."""
    if not os.isatty(fd):
        yield
        return
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def connect_console(path: Path, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class RunRequests:
    """The run process's request socket: one JSON request per connection, one reply.

    `{"cmd": "hotplug"}` starts one more device server and device_adds it on the next free
    pcie-root-port; the reply names it. Served between console relays, never blocking long:
    a client has 2 s to send its line.
    """

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.path = tb.run_dir / RUN_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(4)
        self.hotplugged = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def serve_one(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(2.0)
            try:
                line = conn.makefile("rb").readline(4096)
                request = json.loads(line)
                reply = self.handle(request)
            except (OSError, ValueError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def handle(self, request: object) -> dict[str, object]:
        if not isinstance(request, dict) or request.get("cmd") != "hotplug":
            return {"ok": False, "error": "the only request is {\"cmd\": \"hotplug\"}"}
        if self.hotplugged >= self.tb.cfg.hotplug_ports:
            return {"ok": False, "error": f"all {self.tb.cfg.hotplug_ports} hot-plug ports are "
                                          "taken (harness run --hotplug-ports N)"}
        try:
            dev = self.tb.add_device()
            self.tb.hotplug(dev, port=self.hotplugged)
        except Exception as exc:  # a failed start or QMP error is the client's answer
            return {"ok": False, "error": str(exc).splitlines()[0]}
        self.hotplugged += 1
        run_info(self.tb).write()
        s = dev.spec
        return {"ok": True, "device": s.name, "tap": s.tap, "host": f"{s.host_address}/24",
                "guest": f"{s.guest_address}/24", "mac": s.mac, "control": str(dev.control)}


def relay(tb: Testbed, stdin: int, stdout: int, requests: RunRequests) -> None:
    """Terminal <-> console socket until QEMU exits or the console closes."""
    assert tb.console_socket is not None
    con = connect_console(tb.console_socket)
    with con, cbreak(stdin):
        stdin_open = True
        while tb.machine.running():
            fds = [con.fileno(), requests.fileno()] + ([stdin] if stdin_open else [])
            ready, _, _ = select.select(fds, [], [], 0.5)
            if requests.fileno() in ready:
                requests.serve_one()
            if con.fileno() in ready:
                data = con.recv(65536)
                if not data:
                    return
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    stdin_open = False  # EOF on our input: keep showing the guest's output
                else:
                    con.sendall(data)


def serve_requests(requests: RunRequests, keep_going: Callable[[], bool],
                   poll: float = 0.5) -> None:
    """Answer ``requests`` one at a time while ``keep_going()`` says so, looking again at
    least every ``poll`` seconds (the one loop behind `wait_for_exit` and `serving`)."""
    while keep_going():
        ready, _, _ = select.select([requests.fileno()], [], [], poll)
        if ready and keep_going():
            requests.serve_one()


def wait_for_exit(tb: Testbed, requests: RunRequests) -> None:
    serve_requests(requests, tb.machine.running)


@contextlib.contextmanager
def serving(requests: RunRequests, poll: float = 0.2) -> Iterator[None]:
    """Serve ``requests`` from a thread while the caller blocks (`harness run --exec` waits
    for its command); the thread is stopped and joined on the way out. A request being served
    then (a hot-plug takes a few seconds) is finished first."""
    stop = threading.Event()
    thread = threading.Thread(target=serve_requests, args=(requests, lambda: not stop.is_set(),
                                                           poll),
                              name="run-requests", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


#: `harness run --exec`: how long the guest may take to boot and run its plan (link_up).
PLAN_TIMEOUT = 300.0
#: `harness run --exec` statuses of its own, as GNU timeout and env have them: the command
#: timed out; the harness could not run it (no boot, no agent).
EXIT_TIMED_OUT = 124
EXIT_CANNOT_RUN = 125


def run_command(tb: Testbed, command: str, timeout: float) -> int:
    """Once the plan is done (the link is up), run `command` in the guest through the agent and
    copy its output here; its exit status, or EXIT_TIMED_OUT / EXIT_CANNOT_RUN."""
    try:
        tb.wait_console(ktap.DONE, PLAN_TIMEOUT)
        result = tb.guest.run(command, timeout=timeout)
    except (AgentError, TimeoutError, RuntimeError) as exc:  # RuntimeError: QEMU exited
        print(f"harness run: {exc} (see {tb.console_log})", file=sys.stderr)
        return EXIT_CANNOT_RUN
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    if result.timed_out:
        print(f"harness run: the command timed out after {timeout:g} s", file=sys.stderr)
        return EXIT_TIMED_OUT
    return result.returncode


def run_session(cfg: TestbedConfig, console: str, command: str | None = None,
                command_timeout: float = 600.0) -> int:
    """Boot, print where things are, relay the console (or wait), tear down. Exit status 0
    when the guest powered itself off. With `command`: run it instead (run_command), quietly,
    and return its status."""
    run_dir = paths.new_run_dir(runs_root())
    cmdline = (*SHELL_CMDLINE, *cfg.cmdline)
    cfg = replace(cfg, console="socket", cmdline=cmdline, reboot=True)
    with Testbed(cfg, run_dir) as tb:
        info = run_info(tb)
        info.write()
        if command is not None:
            requests = RunRequests(tb)
            try:
                with serving(requests):
                    return run_command(tb, command, command_timeout)
            finally:
                requests.close()
                with contextlib.suppress(FileNotFoundError):
                    (run_dir / RUN_FILE).unlink()
        requests = RunRequests(tb)
        print(banner(tb, info, console), flush=True)
        try:
            if console == "socket":
                wait_for_exit(tb, requests)
            else:
                relay(tb, sys.stdin.fileno(), sys.stdout.fileno(), requests)
        finally:
            requests.close()
            with contextlib.suppress(FileNotFoundError):
                (run_dir / RUN_FILE).unlink()
        tb.machine.wait(10)
    print("\nharness run: the guest powered off; everything stopped", file=sys.stderr)
    return 0
