"""Process lifetime: children that never outlive the harness, and signals that unwind cleanly.

Every process the harness starts (QEMU, the device server, host peers, the KVM probe) goes
through `popen`, which sets PR_SET_PDEATHSIG in the child: when the harness dies, even by
SIGKILL, the kernel signals the child. SIGTERM and SIGHUP are turned into `Interrupted` (a
KeyboardInterrupt, as Ctrl-C is) by `interrupts()`, so every `finally` and context manager
runs on the way out, exactly as for Ctrl-C. Clean-up steps note what they stopped in
`cleanup_journal`, so the command can say so in one line.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import select
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

#: What clean-up stopped or removed in this process, in order (one short phrase each).
cleanup_journal: list[str] = []


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; `signum` says which (exit status 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def note_cleanup(what: str) -> None:
    cleanup_journal.append(what)


def _die_with_parent(parent: int, sig: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child between fork and exec; the setting survives exec.
        if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            os._exit(126)
        # The parent may have died before prctl: then nobody would ever signal us.
        if os.getppid() != parent:
            os._exit(126)
    return preexec


def popen(argv: Sequence[str], *, death_signal: int = signal.SIGTERM,
          **kwargs: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen whose child gets `death_signal` when this process dies, however."""
    return subprocess.Popen(list(argv), preexec_fn=_die_with_parent(os.getpid(), death_signal),
                            **kwargs)


def run_until(argv: Sequence[str], stop: Callable[[str], bool], timeout: float, *,
              name: str) -> tuple[str, str]:
    """Run a short-lived helper (stdout and stderr as one stream, SIGKILL if we die) until
    ``stop(its output so far)`` holds, it exits, or `timeout` passes; then kill it. Returns
    (output, "stop"|"exit"|"timeout"). For a child that may never exit by itself: QEMU stays
    paused after a KVM internal error (the KVM probe)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = ""
    deadline = time.monotonic() + timeout
    with popen(argv, death_signal=signal.SIGKILL, stdin=subprocess.DEVNULL,
               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        how = "timeout"
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while (left := deadline - time.monotonic()) > 0:
                    if not sel.select(left):
                        continue
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        how = "exit"
                        break
                    out += decoder.decode(chunk)
                    if stop(out):
                        how = "stop"
                        break
        except BaseException:
            # Interrupted: Popen.__exit__ would wait for the child forever.
            proc.kill()
            note_cleanup(f"{name} (pid {proc.pid})")
            raise
        proc.kill()
    return out + decoder.decode(b"", final=True), how


@contextmanager
def managed(argv: list[str], log_path: Path, *, name: str, ready: str | None = None,
          ready_timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """A helper process with its stderr in `log_path`, stopped with SIGTERM then SIGKILL.

    With `ready`, waits until the process prints that line on stdout (and fails if it exits
    or stays silent): the device server must be listening before QEMU starts.
    """
    with log_path.open("wb") as err:
        proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        if ready is not None:
            assert proc.stdout is not None
            deadline = time.monotonic() + ready_timeout
            line = b""
            while line.strip() != ready.encode():
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    raise RuntimeError(f"{name} did not start (see {log_path}):\n"
                                       f"{tail(log_path)}")
                r, _, _ = select.select([proc.stdout], [], [], left)
                if r:
                    line = proc.stdout.readline()
                    if not line and proc.poll() is not None:
                        continue
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM: killing it", name)
                proc.kill()
                proc.wait()
        note_cleanup(f"{name} (pid {proc.pid})")
        if proc.stdout is not None:
            proc.stdout.close()


@contextmanager
def interrupts() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise Interrupted like Ctrl-C raises
    KeyboardInterrupt. Only the first signal raises: a second one during clean-up is
    ignored, so the clean-up it would cut short still finishes (SIGKILL still works)."""
    fired = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def exit_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports a process that a signal ended."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


def report_interrupted(prog: str, exc: KeyboardInterrupt) -> int:
    """Ctrl-C, SIGTERM or SIGHUP ended `prog` after every context manager ran: say which
    signal and what it stopped (on stderr); the exit status a shell would give."""
    done = ", ".join(cleanup_journal) or "nothing was running"
    why = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
    print(f"{prog}: interrupted ({why}), cleaned up: {done}", file=sys.stderr)
    return exit_status(exc)
