"""Fixtures shared by unit-test modules.

``index_kind``: a test module that asks for it (``pytestmark = pytest.mark.usefixtures(
"index_kind")``) runs every test on both GuestMemory region indexes (HARNESS_GUEST_INDEX), so the
faster index must keep every check of the old one.
"""

import pytest

from harness.dma.regionindex import INDEX_ENV, INDEX_KINDS


@pytest.fixture(params=INDEX_KINDS)
def index_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The region index this test runs on."""
    kind: str = request.param
    monkeypatch.setenv(INDEX_ENV, kind)
    return kind
