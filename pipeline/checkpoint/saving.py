"""Saving: every rank's shards, then the COMPLETE marker and the ``latest`` pointer; pruning old
complete checkpoints in the background while training goes on. With a ``BackgroundWriter``
(``checkpoint.async``), the training thread only stages the state into host memory
(``staging.py``); the write, fsync, marker, pointer and prune follow in the background
(``background.py``).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.checkpoint.background import BackgroundWriter
from pipeline.checkpoint.staging import stage_checkpoint
from pipeline.checkpoint.store import (checkpoint_root, complete_checkpoints, fsync_tree, is_complete,
                                       point_latest, remove_checkpoint, step_of, universal_dir, write_marker)
from pipeline.storage import writing

log = logging.getLogger(__name__)

def prune(root: Path, *, keep_last: int) -> list[Path]:
    """Drop complete checkpoints beyond ``keep_last`` (and their universal forms), incomplete ones
    older than the newest complete one, and temporary files of interrupted pointer writes."""
    complete = complete_checkpoints(root)
    if not complete:
        return []
    removed = []
    newest_step = step_of(complete[-1])
    for old in complete[:-keep_last]:
        remove_checkpoint(old)
        remove_checkpoint(universal_dir(old, root))
        removed.append(old)
    for path in sorted(root.iterdir()):
        step = step_of(path)
        if path.is_dir() and step is not None and step < newest_step and not is_complete(path):
            log.info("removing incomplete checkpoint %s (interrupted save)", path.name)
            remove_checkpoint(path)
            removed.append(path)
        elif path.name.startswith(".latest.tmp"):
            path.unlink(missing_ok=True)
    return removed


_pruner: threading.Thread | None = None


def _prune_in_background(root: Path, keep_last: int) -> None:
    """Old checkpoints are deleted while training goes on: removing ~1 GB took 0.2 s of every
    save, with all ranks waiting. Cut short (the process ends), it leaves a directory without
    its marker, which nobody loads and the next prune removes."""
    global _pruner  # save() has joined the previous one already
    _pruner = threading.Thread(target=prune, args=(root,), kwargs={"keep_last": keep_last},
                               name="checkpoint-prune", daemon=True)
    _pruner.start()


def wait_for_prune() -> None:
    """Block until a background prune (if any) is done: before a save, and before exiting."""
    global _pruner
    if _pruner is not None:
        _pruner.join()
        _pruner = None


@contextlib.contextmanager
def _without_crc32():
    """torch.save without the CRC32 of every record: it took a quarter of the save's CPU time, and
    torch.load never checks it (a flipped byte in a tensor loads silently either way; measured).
    Whole checkpoints are guarded by the COMPLETE marker written after fsync instead."""
    try:
        from torch.utils.serialization import config
        previous = config.save.compute_crc32
    except (ImportError, AttributeError):  # an older torch: nothing to switch off
        yield
        return
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = previous


def save(engine: Any, *, output_dir: str | Path, step: int, client_state: dict, marker_info: dict,
         keep_last: int, rank: int, resumed_from: Path | None = None, timings: dict | None = None,
         background: BackgroundWriter | None = None) -> Path:
    """Every rank writes its shards; only then does rank 0 mark the checkpoint complete.

    ``resumed_from``: the checkpoint this run was loaded from; when it is this very step in this
    directory (nothing trained since), it is kept as it is. ``timings``, if given, receives this
    rank's seconds per phase (write, fsync, commit; with ``background``: wait, stage).
    ``background``: save asynchronously through it (a save still in flight is waited for first);
    without it, a save in flight there must have been waited for by the caller.
    """
    import torch.distributed as dist

    root = checkpoint_root(output_dir)
    tag_dir = root / f"step-{step}"
    waited = background.wait() if background is not None else 0.0  # at most one save in flight
    if resumed_from is not None and is_complete(tag_dir) and resumed_from.resolve() == tag_dir.resolve():
        return tag_dir
    wait_for_prune()  # a prune never runs while a save writes (it may remove incomplete steps)
    started = time.perf_counter()
    # A disk that fills up or turns read-only fails the save in one line (storage.py); the marker
    # is never written then, so the directory stays incomplete and nothing ever loads it.
    what = f"checkpoint {tag_dir.name}"
    if rank == 0 and tag_dir.exists():
        # A partial directory of an interrupted save of this step, or a checkpoint of another timeline
        # (e.g. resumed from an older step): stale files (another world size's shards) must not mix in.
        log.info("replacing %s %s", "checkpoint" if is_complete(tag_dir) else "incomplete checkpoint", tag_dir.name)
        with writing(what, tag_dir):
            remove_checkpoint(tag_dir)
            remove_checkpoint(universal_dir(tag_dir, root))
    dist.barrier()
    if background is not None:
        return _save_in_background(engine, background, root=root, tag_dir=tag_dir, step=step,
                                   client_state=client_state, marker_info=marker_info, keep_last=keep_last,
                                   timings=timings, waited=waited, started=started)
    clock = [time.perf_counter()]
    with writing(what, tag_dir), _without_crc32():
        engine.save_checkpoint(str(root), tag=tag_dir.name, client_state=client_state, save_latest=False)
    clock.append(time.perf_counter())
    with writing(what, tag_dir):
        fsync_tree(tag_dir, rank)
    dist.barrier()  # every rank's shards are on disk before the marker says so
    clock.append(time.perf_counter())
    if rank == 0:
        with writing(what, tag_dir):
            write_marker(tag_dir, {"step": step, **marker_info})
            point_latest(root, tag_dir.name)
    dist.barrier()  # nobody exits (or gets killed) believing the save done before the marker exists
    clock.append(time.perf_counter())
    if rank == 0:
        _prune_in_background(root, keep_last)
    if timings is not None:
        timings.update(write=clock[1] - clock[0], fsync=clock[2] - clock[1], commit=clock[3] - clock[2])
    log.info("saved checkpoint %s in %.1f s", tag_dir, clock[-1] - started)
    return tag_dir


def _save_in_background(engine: Any, background: BackgroundWriter, *, root: Path, tag_dir: Path, step: int,
                        client_state: dict, marker_info: dict, keep_last: int, timings: dict | None,
                        waited: float, started: float) -> Path:
    """Stage every rank's state into host memory (DeepSpeed's own save_checkpoint, its barriers
    included), then hand the files to the background writer; the marker follows once every rank's
    files are durable."""
    staged_at = time.perf_counter()
    with writing(f"checkpoint {tag_dir.name}", tag_dir):  # DeepSpeed makes the directory
        files = stage_checkpoint(engine, background.buffers, root=root, tag=tag_dir.name, client_state=client_state)

    def commit() -> None:  # rank 0, in the background, once every rank's files are fsynced
        with writing(f"checkpoint {tag_dir.name}", tag_dir):
            write_marker(tag_dir, {"step": step, **marker_info})
            point_latest(root, tag_dir.name)
        log.info("checkpoint %s complete (written in the background)", tag_dir)
        prune(root, keep_last=keep_last)

    background.start(files, tag_dir=tag_dir, commit=commit, save_without_crc=_without_crc32)
    done = time.perf_counter()
    if timings is not None:
        timings.update(wait=waited, stage=done - staged_at)
    log.info("staged checkpoint %s in %.2f s; writing it in the background", tag_dir, done - started)
    return tag_dir
