"""Where checkpoints live and which ones count: the layout, the COMPLETE marker, finding one.

Layout under ``<output_dir>/checkpoints``::

    step-120/            DeepSpeed's files (every rank writes its shards)
    step-120/COMPLETE    written by rank 0 after every rank's files are on disk: step, world size, model
    step-120_universal/  made once when a run resumes on another data-parallel size
    latest               the tag of the newest complete checkpoint, replaced atomically

A directory without ``COMPLETE`` (a run killed mid-save) is never loaded, and is removed once a
newer complete checkpoint exists, or when the run saves that step again. Removing a checkpoint
takes its marker away first, so that an interrupted removal leaves an incomplete directory,
never a "complete" one with missing files.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


TAG_PATTERN = re.compile(r"^step-(\d+)$")


UNIVERSAL_SUFFIX = "_universal"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used; the message names it and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a part; durable once this returns."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


_RANK_FILE = re.compile(r"pp_rank_(\d+)_")  # DeepSpeed's per-rank shards: zero_pp_rank_3_mp_rank_00_...


def _written_by(name: str, rank: int | None) -> bool:
    if rank is None:
        return True
    match = _RANK_FILE.search(name)
    return int(match.group(1)) == rank if match else rank == 0  # the rest (model states) is rank 0's


def fsync_tree(tag_dir: Path, rank: int | None = None) -> None:
    """Flush a checkpoint's files to disk (torch.save does not): a marker must never reach the
    disk before the data it vouches for, or a machine crash leaves a "complete" checkpoint with
    truncated shards. With ``rank``, only the files that rank wrote (one open per file in all)."""
    for dirpath, _, files in os.walk(tag_dir):
        for name in files:
            if not _written_by(name, rank):
                continue
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def step_of(tag_dir: Path) -> int | None:
    match = TAG_PATTERN.match(tag_dir.name)
    return int(match.group(1)) if match else None


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete ``step-N`` directories, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


def read_marker(tag_dir: Path) -> dict[str, Any]:
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"checkpoint '{tag_dir}' is incomplete (no {COMPLETE} marker: the save was "
                              "interrupted); resume from an older one or with checkpoint.resume=auto")
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint '{tag_dir}': unreadable {COMPLETE} marker ({error}); "
                              "resume from another checkpoint") from None


def latest_complete(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(checkpoint_root(output_dir))
    return found[-1] if found else None


def find_checkpoint(path: str | Path, *, what: str = "--checkpoint") -> Path:
    """The one way a checkpoint is found from a path a user gave (``what`` names the setting): a
    ``step-N`` directory as it is (complete, or refused), or the newest complete one of a run
    directory (or of its checkpoints/)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what}={path}: no such path; give a step-N directory or a run directory")
    if step_of(path) is not None:
        read_marker(path)
        return path
    root = path if path.name == "checkpoints" else checkpoint_root(path)
    found = complete_checkpoints(root)
    if not found:
        raise CheckpointError(f"{what}={path}: no complete step-N checkpoint under it; train first or give a "
                              "step-N directory")
    return found[-1]

def universal_dir(tag_dir: Path, root: Path) -> Path:
    """Where the universal form of ``tag_dir`` goes: the resuming run's own checkpoints folder, so
    that resuming from another run (``checkpoint.resume=PATH``) never writes into that run."""
    return root / f"{tag_dir.name}{UNIVERSAL_SUFFIX}"


def write_marker(tag_dir: Path, info: dict[str, Any]) -> None:
    _atomic_write(tag_dir / COMPLETE, json.dumps({**info, "time": time.time()}, indent=1))


def point_latest(root: Path, tag: str) -> None:
    _atomic_write(root / "latest", tag + "\n")


def remove_checkpoint(path: Path) -> None:
    """Marker first: a removal cut short leaves an incomplete directory, which nobody loads."""
    if not path.exists():
        return
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
