"""libvfio-user's own log messages, into Python logging under ``harness.vfu.libvfio_user``.

The library logs through a callback (harness.vfu.callbacks' harness_log_cb -> VfuContext) with
a syslog level; a context asks it for no more than ``lib_log`` would emit (``syslog_level()``),
which spares the library formatting messages nobody reads.
"""

from __future__ import annotations

import logging

from harness.vfu._vfu import lib

#: libvfio-user's own messages land here.
lib_log = logging.getLogger("harness.vfu.libvfio_user")

_SYSLOG_TO_LOGGING = {
    lib.LOG_ERR: logging.ERROR,
    lib.LOG_WARNING: logging.WARNING,
    lib.LOG_NOTICE: logging.INFO,
    lib.LOG_INFO: logging.INFO,
    lib.LOG_DEBUG: logging.DEBUG,
}


def syslog_level_for(logger: logging.Logger) -> int:
    """The most verbose libvfio-user level the logger would actually emit (saves formatting)."""
    level = logger.getEffectiveLevel()
    if level <= logging.DEBUG:
        return lib.LOG_DEBUG
    if level <= logging.INFO:
        return lib.LOG_INFO
    if level <= logging.WARNING:
        return lib.LOG_WARNING
    return lib.LOG_ERR


def emit(socket_path: str, level: int, msg: str) -> None:
    """One message of the library at syslog ``level``, for the context at ``socket_path``."""
    lib_log.log(_SYSLOG_TO_LOGGING.get(level, logging.ERROR), "%s: %s", socket_path, msg)
