"""RegionHandlers: the Python functions behind one context's regions and callback capabilities.

The body of libvfio-user's region access callback (harness.vfu.callbacks -> VfuContext, inside
vfu_run_ctx). A BAR's accesses go to the read/write pair VfuContext.setup_region registered for
its index. The config-space region only gets what the library does not serve itself: accesses
to a capability added with read and write (VFU_CAP_FLAG_CALLBACK), which go to that pair with
offsets relative to the cap, and bytes outside any cap, which read as stored and refuse writes
exactly as the library does when it has no callback.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, NamedTuple

from harness.vfu._vfu import ffi, lib
from harness.vfu.liblog import lib_log

ReadFn = Callable[[int, int], bytes]
WriteFn = Callable[[int, memoryview], None]


class RegionFns(NamedTuple):
    read: ReadFn
    write: WriteFn


class RegionHandlers:
    """Handlers by region index, and the callback capabilities inside config space.

    ``socket_path`` names the context in log lines; ``config_space`` is the context's
    (VfuContext.config_space), for the bytes outside any callback capability.
    """

    def __init__(self, socket_path: str, config_space: Callable[[], memoryview]) -> None:
        self.socket_path = socket_path
        self._config_space = config_space
        self.by_index: dict[int, RegionFns] = {}
        #: Capabilities served by callbacks: (config offset, size, handlers relative to the cap).
        self.callback_caps: list[tuple[int, int, RegionFns]] = []

    def clear(self) -> None:
        """Drop every handler (callbacks can no longer run), so their closures can go."""
        self.by_index.clear()
        self.callback_caps.clear()

    def config_outside_read(self, offset: int, count: int) -> bytes:
        # What the library does itself without a callback: the bytes as they are.
        return bytes(self._config_space()[offset : offset + count]).ljust(count, b"\0")

    def config_outside_write(self, offset: int, data: memoryview) -> None:
        # Unreachable: _config refuses these before (as the library does without a callback).
        raise OSError(errno.EINVAL, f"config space write at {offset:#x} outside any register")

    def _config(self, buf: Any, count: int, offset: int, is_write: bool) -> int:
        """Config space the library hands to us: callback caps, and bytes outside any cap."""
        for off, size, region in self.callback_caps:
            if off <= offset < off + size:
                if is_write:
                    if offset + count > off + size:
                        break  # straddles the cap's end: refused whole, below
                    view = memoryview(ffi.buffer(buf, count)).toreadonly()
                    try:
                        region.write(offset - off, view)
                    finally:
                        view.release()
                    return count
                inside = min(count, off + size - offset)
                data = region.read(offset - off, inside)
                rest = self.config_outside_read(offset + inside, count - inside)
                ffi.memmove(buf, data[:inside].ljust(inside, b"\0") + rest, count)
                return count
        if not is_write:
            ffi.memmove(buf, self.config_outside_read(offset, count), count)
            return count
        # Exactly the library's answer when it has no callback (an error reply), logged the
        # same way and not counted as a failed callback: nothing in the device refused it.
        lib_log.error("%s: no callback for write to config space offset %d size %d",
                      self.socket_path, offset, count)
        ffi.errno = errno.EINVAL
        return -1

    def access(self, index: int, buf: Any, count: int, offset: int, is_write: bool) -> int:
        """The region callback's body: ``count`` bytes at ``offset`` of region ``index``,
        from or into ``buf`` (libvfio-user's message buffer); returns count, or -1 + errno."""
        if index == lib.VFU_PCI_DEV_CFG_REGION_IDX:
            return self._config(buf, count, offset, is_write)
        region = self.by_index[index]
        if is_write:
            view = memoryview(ffi.buffer(buf, count)).toreadonly()
            try:
                region.write(offset, view)
            finally:
                # buf is libvfio-user's message buffer, freed after we return: make a kept
                # reference fail loudly instead of reading freed memory.
                view.release()
            return count
        data = region.read(offset, count)
        if len(data) != count:
            raise OSError(
                errno.EINVAL,
                f"region {index} read @{offset:#x}: got {len(data)} bytes for {count}",
            )
        ffi.memmove(buf, data, count)
        return count
