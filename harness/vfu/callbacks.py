"""The extern "Python" trampolines: the only Python code libvfio-user calls directly.

Each trampoline finds the owning VfuContext through the context's private pointer (a cffi handle)
and forwards to one of its `_cb_*` methods. No exception ever crosses back into C:

- an OSError carrying an errno is a deliberate refusal (e.g. an access outside a register):
  logged at DEBUG, that errno is handed to libvfio-user, which replies with it;
- any other Exception is a bug in device code: logged at ERROR with its traceback, errno EIO;
- a BaseException that is not an Exception (KeyboardInterrupt, SystemExit) cannot unwind
  through C, so it is stashed on the context and re-raised by the VfuContext call that entered C.

Callbacks returning int/ssize_t then return -1; void ones just return. Every failure except the
log callback's is also counted on the context by kind (``_count_failure``): region_read,
region_write, reset, dma_register, dma_unregister. That is the exact count of refusals by the
device, including those the library never hears of (the DMA callbacks return void).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any, Protocol

from harness.vfu._vfu import ffi, lib

log = logging.getLogger(__name__)


class CallbackTarget(Protocol):
    """What a trampoline needs from the context behind a vfu_ctx_t (VfuContext implements it)."""

    def _cb_log(self, level: int, msg: str) -> None: ...
    def _cb_region(self, index: int, buf: Any, count: int, offset: int, is_write: bool) -> int: ...
    def _cb_reset(self, kind: int) -> None: ...
    def _cb_dma_register(self, info: Any) -> None: ...
    def _cb_dma_unregister(self, info: Any) -> None: ...
    def _defer(self, exc: BaseException) -> None: ...
    def _count_failure(self, kind: str, what: str, exc: BaseException) -> None: ...


def _target(vctx: Any) -> CallbackTarget:
    target: CallbackTarget = ffi.from_handle(lib.vfu_get_private(vctx))
    return target


def _failed(vctx: Any, what: str, exc: BaseException, kind: str | None = None) -> None:
    """Log exc, count it under ``kind``, set the errno C will see, and stash it if it must be
    re-raised later."""
    ffi.errno = failed(lambda: _target(vctx), what, exc, kind)


def failed(target: Callable[[], CallbackTarget], what: str, exc: BaseException,
           kind: str | None = None) -> int:
    """What becomes of a callback body's exception: counted under ``kind`` on the target,
    logged, stashed on it to be raised after the C call if it is not an Exception; the errno C
    should see. Also for work a callback left for after its C call (harness.vfu.dmaregs)."""
    if kind is not None:
        try:
            target()._count_failure(kind, what, exc)
        except Exception:  # the handle itself is broken; the log line below still says it
            log.exception("cannot count the failure of %s", what)
    if isinstance(exc, OSError) and exc.errno:
        log.debug("%s refused: %s", what, exc)
        return exc.errno
    if isinstance(exc, Exception):
        log.error("%s callback failed: %r", what, exc, exc_info=exc)
        return errno.EIO
    try:
        target()._defer(exc)
    except Exception:  # the handle itself is broken; nothing left to tell
        log.exception("cannot defer %r from %s", exc, what)
    return errno.EIO


# libvfio-user saves and restores errno around its own logging, so this one must not fail loudly.
@ffi.def_extern()  # type: ignore[untyped-decorator]
def harness_log_cb(vctx: Any, level: int, msg: Any) -> None:
    try:
        _target(vctx)._cb_log(level, ffi.string(msg).decode(errors="replace"))
    except BaseException as exc:
        _failed(vctx, "log", exc)


@ffi.def_extern()  # type: ignore[untyped-decorator]
def harness_reset_cb(vctx: Any, kind: int) -> int:
    try:
        _target(vctx)._cb_reset(kind)
    except BaseException as exc:
        _failed(vctx, "reset", exc, "reset")
        return -1
    return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def harness_dma_register_cb(vctx: Any, info: Any) -> None:
    try:
        _target(vctx)._cb_dma_register(info)
    except BaseException as exc:
        _failed(vctx, "DMA register", exc, "dma_register")


@ffi.def_extern()  # type: ignore[untyped-decorator]
def harness_dma_unregister_cb(vctx: Any, info: Any) -> None:
    try:
        _target(vctx)._cb_dma_unregister(info)
    except BaseException as exc:
        _failed(vctx, "DMA unregister", exc, "dma_unregister")


def _make_region_trampoline(index: int) -> None:
    """Register harness_region_cb<index>: the C callback carries no region index, so each region
    gets its own entry point that supplies it."""

    def trampoline(vctx: Any, buf: Any, count: int, offset: int, is_write: bool) -> int:
        try:
            return _target(vctx)._cb_region(index, buf, count, offset, is_write)
        except BaseException as exc:
            kind = "region_write" if is_write else "region_read"
            _failed(vctx, f"region {index} {'write' if is_write else 'read'} @{offset:#x}", exc,
                    kind)
            return -1

    trampoline.__name__ = f"harness_region_cb{index}"
    ffi.def_extern(name=trampoline.__name__)(trampoline)


def region_trampoline(index: int) -> Any:
    """The C function pointer serving region `index` (< NUM_REGION_TRAMPOLINES)."""
    return getattr(lib, f"harness_region_cb{index}")


def _count_region_trampolines() -> int:
    # The compiled module is the truth (harness.vfu.build declares BAR0..5, ROM, config space).
    n = 0
    while hasattr(lib, f"harness_region_cb{n}"):
        n += 1
    return n


#: How many region indices have a trampoline.
NUM_REGION_TRAMPOLINES = _count_region_trampolines()

for _i in range(NUM_REGION_TRAMPOLINES):
    _make_region_trampoline(_i)
del _i
