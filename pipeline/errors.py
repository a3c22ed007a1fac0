"""The errors that end a run on purpose, and the exit code each one means.

This module is the bottom floor: it imports only the standard library, so that every layer
(config first) can raise these classes, and the launcher maps an error to its exit code by the
class alone (``exit_code_for``), without importing the layers that raise them.

Exit codes (README.md, "Exit codes"):
- 0: finished; 75: stopped by SIGTERM/SIGUSR1 after saving (requeue me); 130: stopped by
  Ctrl-C (SIGINT) after saving (preemption.py decides these two);
- 2: a ``UserError``: something the user fixes (config, data, checkpoint, launch environment,
  a disk that is full or read-only); a requeue would only fail again;
- 1: anything else (a bug, a crash), and ``TrainingError`` (the run itself diverged).
"""
from __future__ import annotations

import errno
import os

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class PipelineError(Exception):
    """An error the run reports in one line (no traceback) and ends with ``exit_code``."""

    exit_code = EXIT_FAILURE


class UserError(PipelineError):
    """A mistake the user can fix; the message names it and the fix."""

    exit_code = EXIT_USER_ERROR


class StorageError(UserError):
    """A file of the run could not be written (disk full, read-only, no permission): the message
    says what, where and the operating system's reason. An environment error, so exit 2. (Not an
    OSError: an ``except OSError`` meant for something optional must not swallow it.)"""


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on (e.g. non-finite losses); the message says why. Exit 1: the run, not
    the user's input, failed, but it is still said in one line."""


# The errno values that mean "this storage cannot take the write", as opposed to a bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO,
                            errno.EFBIG})


def is_storage_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


def os_reason(error: OSError) -> str:
    """'[Errno 28] No space left on device', without the file name OSError's str() appends."""
    if error.errno is None:
        return str(error)
    return f"[Errno {error.errno}] {error.strerror or errno.errorcode.get(error.errno, '')}".strip()


def storage_error(what: str, path, error: OSError) -> StorageError:
    """The one line for a failed write: what could not be written, where, and the OS reason."""
    where = getattr(error, "filename", None) or path
    where = os.fsdecode(where) if isinstance(where, bytes) else where
    return StorageError(f"could not write {what} to '{where}': {os_reason(error)}; free space "
                        "or fix the permissions there, or set train.output_dir to another disk")


def one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


def exit_code_for(error: BaseException) -> int:
    """The class decides: a PipelineError's ``exit_code``, 130 for Ctrl-C, 1 for everything else."""
    if isinstance(error, PipelineError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE


# Kept for callers that catch "the errors a user can fix" (launch/export.py).
USER_ERRORS = (UserError,)
