"""Talk to the guest's shell over its serial console socket: run a command, get output and status.

Used by the VM tests of `harness run`, reset and hot-plug. Each command is followed by an echo of
a unique marker with `$?`, so the output and the exit status are cut out of the console stream
exactly, whatever the kernel prints in between (mostly: kernel messages can still interleave).
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    returncode: int
    output: str


class GuestConsole:
    """A connection to QEMU's console socket (one client at a time)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buffer = ""
        self._n = 0

    def close(self) -> None:
        self.sock.close()

    def _read(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            raise EOFError("the console closed (QEMU exited?)")
        self.buffer += data.decode(errors="replace").replace("\r", "")

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for a regex in the console output; consume everything up to its end."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.buffer)
            if m:
                self.buffer = self.buffer[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"console: no {pattern!r} within {timeout:.0f} s; "
                                   f"last output: {self.buffer[-500:]!r}")
            self._read(min(left, 0.5))

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def run(self, command: str, timeout: float = 60.0) -> Result:
        """Run a shell command in the guest; its output (without the echoed command line)."""
        self._n += 1
        tag = f"HARNESS_{self._n}_{time.monotonic_ns()}"
        # The marker is built from two halves so that the echoed command line never matches.
        self.send(f"{command}; echo {tag[:8]}''{tag[8:]}=$?\n")
        m = self.expect(rf"(?s)^(.*?){re.escape(tag)}=(\d+)\n", timeout)
        lines = m.group(1).split("\n")
        # Drop the echo of the command line itself (the first line holding the marker halves).
        output = "\n".join(ln for ln in lines if f"{tag[:8]}''" not in ln)
        return Result(int(m.group(2)), output.strip("\n"))
