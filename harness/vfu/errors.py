"""The exception tree of the libvfio-user boundary and the one errno -> exception translation.

OSError
 '- VfuError              a libvfio-user call failed (rc -1); .errno says why
     '- Disconnected      the vfio-user client is gone (ENOTCONN, ESHUTDOWN, ECONNRESET)
         '- ClientDropped the server dropped the client after a failure that was not a clean
                          disconnect (.errno and __cause__: that failure)

After a Disconnected (and so a ClientDropped) the context listens again: attach() takes the next
client.
"""

from __future__ import annotations

import errno as errno_mod
import os

#: errnos meaning "the client connection is gone", as libvfio-user reports them.
DISCONNECT_ERRNOS = frozenset({errno_mod.ENOTCONN, errno_mod.ESHUTDOWN, errno_mod.ECONNRESET})


class VfuError(OSError):
    """A libvfio-user call returned -1; `errno` is the errno it left behind."""


class Disconnected(VfuError):
    """The vfio-user client disconnected; the context can attach() a new one."""


class ClientDropped(Disconnected):
    """A request failed in a way that leaves the connection unusable (not a clean disconnect),
    so the context dropped the client; the context can attach() a new one."""


def error_from_errno(err: int, what: str) -> VfuError:
    """The exception for a libvfio-user call `what` that failed with errno `err`."""
    if err == 0:
        # libvfio-user promises errno on every -1; a 0 here means a bug, not success.
        err = errno_mod.EIO
    cls = Disconnected if err in DISCONNECT_ERRNOS else VfuError
    return cls(err, f"{what}: {os.strerror(err)}")
