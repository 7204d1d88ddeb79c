"""Keeping key material out of crash dumps (issue: no plaintext at rest, point 5).

A node with encryption enabled holds unwrapped data keys (and the KEK provider's handle) in
its memory; a core dump would write them to disk in the clear. `disable_core_dumps()` sets the
process's core-file size limit to 0 (soft and hard, so the process cannot raise it again) and
marks it not dumpable (`prctl(PR_SET_DUMPABLE, 0)`, which also stops same-user ptrace and
`/proc/<pid>/mem` reads). The encryption plugin calls it on the start-up thread, before any key
is unwrapped.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys

from sealkv.plugins.api import StartupRefused

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def disable_core_dumps() -> None:
    """Sets RLIMIT_CORE to (0, 0) and PR_SET_DUMPABLE to 0, then logs that it did.

    Raises `StartupRefused` when either cannot be applied (the node must not hold keys in a
    process that could dump them).
    """
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        raise StartupRefused(f"cannot disable core dumps (RLIMIT_CORE 0): {exc}; the node "
                             "holds unwrapped data keys and refuses to run dumpable") from None
    dumpable = "not dumpable (PR_SET_DUMPABLE 0)"
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 or libc.prctl(PR_GET_DUMPABLE, 0, 0, 0,
                                                                        0) != 0:
            raise StartupRefused("cannot mark the process not dumpable (prctl PR_SET_DUMPABLE "
                                 f"0 failed, errno {ctypes.get_errno()}); refusing to hold "
                                 "data keys in a dumpable process")
    else:
        dumpable = "dumpable flag not available on this platform"
    log.info("core dumps disabled for this process (RLIMIT_CORE 0, %s): data keys stay out of "
             "crash dumps", dumpable)


def core_dumps_disabled() -> bool:
    """Whether this process currently has RLIMIT_CORE 0 and (on Linux) is not dumpable."""
    if resource.getrlimit(resource.RLIMIT_CORE) != (0, 0):
        return False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
    return True
