"""Sharded DeepSpeed checkpoints that are never half-written, and finding the one to resume.

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

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.storage import writing

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TAG_PATTERN = re.compile(r"^step-(\d+)$")
UNIVERSAL_SUFFIX = "_universal"

# Model fields that change the weights' shapes (or their meaning): a checkpoint saved with other
# values cannot be loaded. The others (dropout, activation checkpointing, ...) may change on resume.
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size", "num_channels", "qkv_bias", "num_labels", "pooler_output_size")
# Model fields that may differ on resume without a refusal (logged when they do).
FREE_FIELDS = ("size", "activation_checkpointing", "hidden_dropout_prob", "attention_probs_dropout_prob")


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


def resolve_resume(resume: str, output_dir: str | Path, *, overwrite: bool) -> Path | None:
    """The checkpoint directory to load, or None to start fresh (``checkpoint.resume``)."""
    if resume == "auto":
        return latest_complete(output_dir)
    if resume == "none":
        existing = latest_complete(output_dir)
        if existing is not None and not overwrite:
            raise CheckpointError(f"'{output_dir}' already holds checkpoints (newest {existing.name}) and "
                                  "checkpoint.resume=none; use checkpoint.resume=auto to continue it, "
                                  "checkpoint.overwrite=true to start over, or another train.output_dir")
        return None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume={resume}: no such path; give a step-N directory or a run directory")
    if step_of(path) is None:  # a run directory (or its checkpoints folder): take its newest
        root = path if path.name == "checkpoints" else checkpoint_root(path)
        found = complete_checkpoints(root)
        if not found:
            raise CheckpointError(f"checkpoint.resume={resume}: no complete step-N checkpoint under it")
        return found[-1]
    read_marker(path)
    return path


def start_over(output_dir: str | Path) -> None:
    """``checkpoint.resume=none`` with ``overwrite=true``: drop the old run's checkpoints, so that
    neither pruning nor a later ``resume=auto`` mixes the two runs up (rank 0 only)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        log.warning("checkpoint.overwrite=true: removing the previous run's checkpoints in %s", root)
        for path in sorted(root.iterdir()):
            if path.is_dir() and (step_of(path) is not None or path.name.endswith(UNIVERSAL_SUFFIX)):
                remove_checkpoint(path)
        (root / "latest").unlink(missing_ok=True)


@dataclass(frozen=True)
class ResumePlan:
    tag_dir: Path  # the step-N directory chosen
    marker: dict[str, Any]
    universal: bool  # load through DeepSpeed's universal format (data-parallel size changed)

    @property
    def step(self) -> int:
        return int(self.marker["step"])


def plan_resume(tag_dir: Path | None, *, model_config: dict, zero_stage: int, world_size: int) -> ResumePlan | None:
    """Check a checkpoint against this run before any weights are touched."""
    if tag_dir is None:
        return None
    marker = read_marker(tag_dir)
    saved_model = marker.get("model", {})

    def differs(key: str) -> bool:
        return key in saved_model and saved_model[key] != model_config.get(key)

    mismatched = [f"model.{key} (checkpoint {saved_model[key]!r}, config {model_config.get(key)!r})"
                  for key in SHAPE_FIELDS if differs(key)]
    if mismatched:
        raise CheckpointError(f"checkpoint '{tag_dir}' was saved with another model shape: {'; '.join(mismatched)}; "
                              "set these fields as the checkpoint has them, or use another train.output_dir")
    changed = [key for key in saved_model if key not in SHAPE_FIELDS + FREE_FIELDS and differs(key)]
    if changed:
        log.warning("resuming %s with changed model fields: %s", tag_dir.name,
                    ", ".join(f"{k} {saved_model[k]!r} -> {model_config.get(k)!r}" for k in changed))
    if marker.get("zero_stage") != zero_stage:
        raise CheckpointError(f"checkpoint '{tag_dir}' was saved with ZeRO-{marker.get('zero_stage')} but "
                              f"train.zero_stage={zero_stage}; resume with train.zero_stage={marker.get('zero_stage')}")
    universal = marker.get("world_size") != world_size and zero_stage > 0
    return ResumePlan(tag_dir=tag_dir, marker=marker, universal=universal)


def universal_dir(tag_dir: Path, root: Path) -> Path:
    """Where the universal form of ``tag_dir`` goes: the resuming run's own checkpoints folder, so
    that resuming from another run (``checkpoint.resume=PATH``) never writes into that run."""
    return root / f"{tag_dir.name}{UNIVERSAL_SUFFIX}"


def convert_to_universal(tag_dir: Path, root: Path) -> Path:
    """DeepSpeed's ds_to_universal, once per checkpoint; the result carries a copy of the source's
    marker, and is made again when that no longer matches (the source was saved anew)."""
    target = universal_dir(tag_dir, root)
    if is_complete(target) and (target / COMPLETE).read_text() == (tag_dir / COMPLETE).read_text():
        return target
    remove_checkpoint(target)
    root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise CheckpointError(f"converting '{tag_dir}' to a universal checkpoint failed: "
                              f"{lines[-1] if lines else result.returncode}")
    (root / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer; we name tags explicitly
    fsync_tree(target)
    _atomic_write(target / COMPLETE, (tag_dir / COMPLETE).read_text())
    log.info("converted %s to DeepSpeed's universal format in %.1f s: %s", tag_dir, time.perf_counter() - started,
             target)
    return target


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
         keep_last: int, rank: int, resumed_from: Path | None = None, timings: dict | None = None) -> Path:
    """Every rank writes its shards; only then does rank 0 mark the checkpoint complete.

    ``resumed_from``: the checkpoint this run was loaded from; when it is this very step in this
    directory (nothing trained since), it is kept as it is. ``timings``, if given, receives this
    rank's seconds per phase (write, fsync, commit).
    """
    import torch.distributed as dist

    root = checkpoint_root(output_dir)
    tag_dir = root / f"step-{step}"
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


def load(engine: Any, plan: ResumePlan, *, output_dir: str | Path) -> dict:
    """Load weights, optimizer, scheduler into the engine; return our client state."""
    import torch.distributed as dist

    tag_dir = plan.tag_dir
    if plan.universal:
        root = checkpoint_root(output_dir)
        error = None
        if dist.get_rank() == 0:
            try:
                convert_to_universal(tag_dir, root)
            except CheckpointError as caught:  # raised after the barrier, so that no rank waits forever
                error = caught
        dist.barrier()
        if error is not None:
            raise error
        tag_dir = universal_dir(tag_dir, root)
        if not is_complete(tag_dir):
            raise CheckpointError(f"universal conversion of '{plan.tag_dir}' did not complete; see rank 0's log")
    from pipeline.checkpoint_read import faster_reads, materialized

    with faster_reads(engine):  # same result as DeepSpeed's reads, in about half the time
        path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load '{tag_dir}'; the files are missing or unreadable")
    client_state = dict(client_state or {})
    client_state.pop("optimizer", None)  # DeepSpeed's (ZeRO-0): already inside the engine, already copied
    return materialized(client_state)  # nothing we keep refers to the checkpoint's files
