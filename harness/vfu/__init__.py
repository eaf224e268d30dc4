"""harness.vfu: the C boundary; the only package that touches cffi's ffi/lib for libvfio-user.

Everything else imports the Pythonic layer from here. VfuContext and memory_barrier load the
compiled extension (built by `python -m harness.vfu.build`) on first use, so the build module and
the plain data types stay importable before the extension exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.vfu.errors import ClientDropped, Disconnected, VfuError
from harness.vfu.model import DmaRegion, ResetType

if TYPE_CHECKING:
    from harness.vfu.context import VfuContext, memory_barrier

__all__ = [
    "ClientDropped",
    "Disconnected",
    "DmaRegion",
    "ResetType",
    "VfuContext",
    "VfuError",
    "memory_barrier",
]

_LAZY = {"VfuContext", "memory_barrier"}


def __getattr__(name: str) -> Any:
    # Deferred so `python -m harness.vfu.build` works before _vfu*.so exists.
    if name in _LAZY:
        from harness.vfu import context

        return getattr(context, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
