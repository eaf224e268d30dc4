"""Private network namespaces for one run: created with a unique name, always removed.

Every TAP device and host-side peer of a run lives in a namespace the run created, so test
traffic (198.18.0.0/15) can never reach a real network.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import netns

from harness.proc import note_cleanup

log = logging.getLogger(__name__)
_OWNED = re.compile(r"^(?P<prefix>[a-z]+)-(?P<pid>\d+)-[0-9a-f]{6}$")

def unique_name(prefix: str = "hns") -> str:
    """A namespace name no other run uses (pid plus random suffix; <= 15 chars is not needed)."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def enter(name: str) -> None:
    """Move the calling process into the named namespace (for a freshly started child)."""
    # flags=0: never create a namespace by accident (os.setns only exists from Python 3.12).
    netns.setns(name, flags=0)


def owner_alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether the harness process that named a namespace still runs (a Python process with
    that pid: after a reboot or pid reuse an unrelated process does not count)."""
    try:
        return b"python" in (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def stale(names: list[str], prefix: str = "hns",
          alive: Callable[[int], bool] = owner_alive) -> list[str]:
    """Namespaces of ours (prefix-<pid>-<hex>) whose owner is gone."""
    out = []
    for name in names:
        m = _OWNED.match(name)
        if m and m.group("prefix") == prefix and not alive(int(m.group("pid"))):
            out.append(name)
    return out


def remove_stale(prefix: str = "hns") -> list[str]:
    """Remove namespaces a killed run left behind (SIGKILL runs no clean-up), saying so."""
    removed = []
    for name in stale(netns.listnetns(), prefix):
        try:
            netns.remove(name)
        except OSError as exc:
            log.warning("could not remove stale network namespace %s: %s", name, exc)
            continue
        log.warning("removed stale network namespace %s (the run that made it is gone)", name)
        removed.append(name)
    return removed


@contextmanager
def private_netns(prefix: str = "hns") -> Iterator[str]:
    """Create a namespace, yield its name, remove it on exit (on failure too). Namespaces
    that killed runs left behind are removed first."""
    if os.geteuid() != 0:
        raise PermissionError("creating network namespaces needs root (run as root or in CI)")
    remove_stale(prefix)
    name = unique_name(prefix)
    netns.create(name)
    log.info("created network namespace %s", name)
    try:
        yield name
    finally:
        try:
            netns.remove(name)
            log.info("removed network namespace %s", name)
            note_cleanup(f"netns {name}")
        except OSError as exc:
            log.error("could not remove network namespace %s: %s", name, exc)
