"""One QEMU process: launch, QMP, console watching and a shutdown that always happens.

Modelled on QEMU's python/qemu/machine: a context manager whose exit asks QEMU to `quit`
over QMP, waits, and kills it if it does not go; launch failures carry argv, exit code and
the tail of QEMU's own log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.proc import note_cleanup, popen, tail

log = logging.getLogger(__name__)


class MachineError(Exception):
    """QEMU failed to start or died: carries argv, exit code and the tail of its log."""

    def __init__(self, message: str, argv: list[str], exitcode: int | None, log_tail: str):
        super().__init__(message)
        self.argv = argv
        self.exitcode = exitcode
        self.log_tail = log_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.exitcode is not None:
            text += f" (exit code {self.exitcode})"
        if self.log_tail:
            text += "\n--- QEMU log tail ---\n" + self.log_tail
        return text


class Machine:
    """A running QEMU guest with a QMP connection."""

    def __init__(self, argv: list[str], *, qmp_socket: Path, log_path: Path,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.argv = argv
        #: Open fds QEMU inherits (a TAP for `-netdev tap,fd=N`).
        self.pass_fds = pass_fds
        self.qmp_socket = qmp_socket
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self.launched_at = 0.0

    # -- lifecycle -----------------------------------------------------------------------

    def launch(self, qmp_timeout: float = 30.0) -> None:
        """Start QEMU and connect to its QMP socket; raise MachineError if it dies first."""
        log.info("launching QEMU: %s", " ".join(self.argv))
        with self.log_path.open("wb") as out:
            # Its own session: a Ctrl-C meant for the harness must not kill the guest before
            # the harness shuts it down; PR_SET_PDEATHSIG still stops it if the harness dies.
            self._proc = popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, pass_fds=self.pass_fds)
        self.launched_at = time.monotonic()
        deadline = self.launched_at + qmp_timeout
        while True:
            if self._proc.poll() is not None:
                raise self._error("QEMU exited during start-up")
            if self.qmp_socket.exists():
                qmp = QEMUMonitorProtocol(str(self.qmp_socket))
                try:
                    qmp.connect()
                except (QMPError, OSError):
                    qmp.close()
                else:
                    self._qmp = qmp
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise self._error(f"no QMP connection within {qmp_timeout:.0f} s")
            time.sleep(0.05)

    def _error(self, message: str) -> MachineError:
        code = self._proc.poll() if self._proc else None
        return MachineError(message, self.argv, code, tail(self.log_path))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exitcode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def wait(self, timeout: float) -> int | None:
        """Wait for QEMU to exit by itself; its exit code, or None on timeout."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def qmp(self, command: str, **arguments: Any) -> object:
        """Run one QMP command and return its result."""
        if self._qmp is None:
            raise MachineError("QMP is not connected", self.argv, self.exitcode(), "")
        return self._qmp.cmd(command, **arguments)

    def ask(self, command: str, arguments: dict[str, object], timeout: float = 5.0) -> object:
        """One QMP command that gives up after ``timeout`` seconds (raising): for looking at
        a guest that may have wedged QEMU itself."""
        if self._qmp is None:
            raise MachineError("QMP is not connected", self.argv, self.exitcode(), "")
        self._qmp.settimeout(timeout)
        try:
            return self._qmp.cmd(command, **arguments)
        finally:
            self._qmp.settimeout(None)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """QMP quit, then wait, then kill: QEMU is gone when this returns."""
        if self._proc is not None and self._proc.poll() is None:
            note_cleanup(f"QEMU (pid {self._proc.pid})")
        if self._proc is not None and self._proc.poll() is None and self._qmp is not None:
            try:
                self._qmp.cmd("quit")
            except (QMPError, OSError, EOFError) as exc:
                log.debug("QMP quit failed (QEMU may be exiting already): %s", exc)
            if self.wait(timeout) is None:
                log.warning("QEMU did not quit within %.0f s: killing it", timeout)
        self.kill()
        if self._qmp is not None:
            # QEMU is gone: the QMP library reports the closed socket as EOFError.
            with contextlib.suppress(QMPError, OSError, EOFError):
                self._qmp.close()
            self._qmp = None
        return self.exitcode()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()
