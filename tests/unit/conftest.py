"""Fixtures shared by unit-test modules.

``index_kind``: a test module that asks for it (``pytestmark = pytest.mark.usefixtures(
"index_kind")``) runs every test on both GuestMemory region indexes (HARNESS_GUEST_INDEX), so the
faster index must keep every check of the old one.

``misbehave_clock``: the misbehaviours' clock (harness.virtio.misbehave), moved by hand.

``sock_path``: a vfio-user socket path in a short private directory (pytest's tmp_path can
exceed sun_path's 108 bytes), removed afterwards.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from harness.dma.regionindex import INDEX_ENV, INDEX_KINDS
from harness.virtio import misbehave as misbehave_module


@pytest.fixture(params=INDEX_KINDS)
def index_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The region index this test runs on."""
    kind: str = request.param
    monkeypatch.setenv(INDEX_ENV, kind)
    return kind


@pytest.fixture
def misbehave_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The misbehaviours' clock, moved by hand: t[0] is now."""
    t = [1000.0]
    monkeypatch.setattr(misbehave_module, "_clock", lambda: t[0])
    return t


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A socket path a libvfio-user context can listen on."""
    d = tempfile.mkdtemp(prefix="vfu-")
    try:
        yield os.path.join(d, "dev.sock")
    finally:
        shutil.rmtree(d)
