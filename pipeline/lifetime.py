"""Helper processes that end with the process that started them, however it ends (kill -9 too).

Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) has the kernel send a signal to a
process when its parent dies. It fires when the *thread* that forked the child exits, not the
whole process: callers set it only for children forked by a thread that lives as long as the
parent (a main thread, or a single-threaded fork server). Standard library only.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def die_with_parent(expected_parent: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where that is
    not available (not Linux). If the parent is already gone (or is not ``expected_parent``),
    the process exits at once: the signal would never come."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have died before the prctl: then this process was already reparented.
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)
    return True


def name_this_process(name: bytes) -> None:
    """The kernel's name of this process (``prctl(PR_SET_NAME)``, 15 bytes: ``ps -e``, ``top``);
    processes it forks inherit it. Nothing where that is not available."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
