"""Writes that fail for want of a disk become one line: what could not be written, where, and why.

A full or read-only disk reaches Python as ``OSError: [Errno 28]`` from a plain write, but
torch.save reports it as ``RuntimeError: [enforce fail at inline_container.cc] ... unexpected
pos`` and drops the reason. ``writing`` turns both into a ``StorageError`` (exit 2); for the
RuntimeError it asks the disk itself (a small probe write) whether it is the cause, so a real
bug is never reported as a full disk. Standard library only.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from pipeline.errors import StorageError, is_storage_error, os_reason, storage_error

PROBE_BYTES = 4096  # one block: a full disk refuses it even where a few bytes still fit


def probe(folder: Path) -> OSError | None:
    """Write, flush and remove a small file in ``folder``; the OSError if the disk refuses it."""
    path = Path(folder) / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(path, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        return error
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return None


def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def writing(what: str, path: Path):
    """Run a write of ``what`` (e.g. "checkpoint step-40") into ``path``; a failure the disk
    explains is re-raised as a one-line StorageError, anything else as it was."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        if not is_storage_error(error):
            raise
        raise storage_error(what, path, error) from None
    except RuntimeError as error:  # torch.save's report of a failed write carries no reason
        refused = probe(_existing(path))
        if refused is None:
            raise
        raise storage_error(what, path, refused) from error


def check_writable(output_dir: Path) -> None:
    """Create ``output_dir`` and write a block into it (and into its checkpoints folder, when one
    exists): a read-only or full disk, or missing permissions, is refused before the run starts."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"cannot create train.output_dir '{output_dir}': {os_reason(error)}; "
                           "choose a writable train.output_dir") from None
    for folder in (output_dir, output_dir / "checkpoints"):
        if folder.is_dir() and (refused := probe(folder)) is not None:
            raise StorageError(f"cannot write to '{folder}': {os_reason(refused)}; free space or fix the "
                               "permissions there, or choose another train.output_dir")


def rewrite_small_file(path: Path, text: str) -> None:
    """Replace a small file's content in place (no new block is needed when the file already
    holds one): so that the exit status can still be written on a disk that has just filled up."""
    path = Path(path)
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the lines of a JSON-lines file (metrics, ledger) whose ``step`` is after ``step``, and
    any torn last line: a resumed run writes those steps again (the interrupted run wrote them
    after its last checkpoint). Atomic: the old file stays whole until the new one replaces it."""
    path = Path(path)
    if not path.is_file():
        return

    def row_step(line: str) -> float:
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            return float("inf")  # a torn line of a killed run: dropped

    kept = [line for line in path.read_text().splitlines() if line.strip() and row_step(line) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
