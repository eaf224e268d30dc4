"""Private network namespaces for one run: created with a unique name, always removed.

Every TAP device and host-side peer of a run lives in a namespace the run created, so test
traffic (198.18.0.0/15) can never reach a real network.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import netns

log = logging.getLogger(__name__)

def unique_name(prefix: str = "hns") -> str:
    """A namespace name no other run uses (pid plus random suffix; <= 15 chars is not needed)."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def enter(name: str) -> None:
    """Move the calling process into the named namespace (for a freshly started child)."""
    # flags=0: never create a namespace by accident (os.setns only exists from Python 3.12).
    netns.setns(name, flags=0)


@contextmanager
def private_netns(prefix: str = "hns") -> Iterator[str]:
    """Create a namespace, yield its name, remove it on exit (on failure too)."""
    if os.geteuid() != 0:
        raise PermissionError("creating network namespaces needs root (run as root or in CI)")
    name = unique_name(prefix)
    netns.create(name)
    log.info("created network namespace %s", name)
    try:
        yield name
    finally:
        try:
            netns.remove(name)
            log.info("removed network namespace %s", name)
        except OSError as exc:
            log.error("could not remove network namespace %s: %s", name, exc)
