"""Sharded DeepSpeed checkpoints that are never half-written, and finding the one to resume.

Layout under ``<output_dir>/checkpoints``::

    step-120/            DeepSpeed's files (every rank writes its shards)
    step-120/COMPLETE    written by rank 0 after every rank finished: step, world size, model config
    step-120_universal/  made once when a run resumes on another data-parallel size
    latest               the tag of the newest complete checkpoint, replaced atomically

A directory without ``COMPLETE`` (a run killed mid-save) is never loaded, and is removed once a
newer complete checkpoint exists.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TAG_PATTERN = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def step_of(tag_dir: Path) -> int | None:
    match = TAG_PATTERN.match(tag_dir.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete ``step-N`` directories, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def read_marker(tag_dir: Path) -> dict[str, Any]:
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"checkpoint '{tag_dir}' is incomplete (no {COMPLETE} marker: the save was "
                              "interrupted); resume from an older one or with checkpoint.resume=auto")
    return json.loads(marker.read_text())


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
    mismatched = [f"{key} (checkpoint {saved_model.get(key)!r}, config {value!r})"
                  for key, value in model_config.items()
                  if key not in ("activation_checkpointing", "size") and saved_model.get(key) != value]
    if mismatched:
        raise CheckpointError(f"checkpoint '{tag_dir}' was saved with another model: {'; '.join(mismatched)}; "
                              "use the checkpoint's model config or another train.output_dir")
    if marker.get("zero_stage") != zero_stage:
        raise CheckpointError(f"checkpoint '{tag_dir}' was saved with ZeRO-{marker.get('zero_stage')} but "
                              f"train.zero_stage={zero_stage}; resume with train.zero_stage={marker.get('zero_stage')}")
    universal = marker.get("world_size") != world_size and zero_stage > 0
    return ResumePlan(tag_dir=tag_dir, marker=marker, universal=universal)


def convert_to_universal(tag_dir: Path) -> Path:
    """DeepSpeed's ds_to_universal, once per checkpoint; the result carries its own marker."""
    target = tag_dir.with_name(f"{tag_dir.name}_universal")
    if (target / COMPLETE).is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
    log.info("converting %s to DeepSpeed's universal format (data-parallel size changed)", tag_dir.name)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckpointError(f"converting '{tag_dir}' to a universal checkpoint failed: "
                              f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    shutil.copy(tag_dir / COMPLETE, target / COMPLETE)
    return target


def write_marker(tag_dir: Path, info: dict[str, Any]) -> None:
    _atomic_write(tag_dir / COMPLETE, json.dumps({**info, "time": time.time()}, indent=1))


def point_latest(root: Path, tag: str) -> None:
    _atomic_write(root / "latest", tag + "\n")


def prune(root: Path, *, keep_last: int) -> None:
    """Drop complete checkpoints beyond ``keep_last`` and incomplete ones older than the newest."""
    complete = complete_checkpoints(root)
    if not complete:
        return
    newest_step = step_of(complete[-1])
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.with_name(f"{old.name}_universal"), ignore_errors=True)
    for path in root.iterdir():
        step = step_of(path)
        if path.is_dir() and step is not None and step < newest_step and not (path / COMPLETE).is_file():
            log.info("removing incomplete checkpoint %s (interrupted save)", path.name)
            shutil.rmtree(path, ignore_errors=True)


def save(engine: Any, *, output_dir: str | Path, step: int, client_state: dict, marker_info: dict,
         keep_last: int, rank: int) -> Path:
    """Every rank writes its shards; only then does rank 0 mark the checkpoint complete."""
    import torch.distributed as dist

    root = checkpoint_root(output_dir)
    tag = f"step-{step}"
    if (root / tag / COMPLETE).is_file():
        return root / tag  # already saved at this step (e.g. a periodic save that was also the last)
    started = time.perf_counter()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shards are on disk before the marker says so
    if rank == 0:
        write_marker(root / tag, {"step": step, **marker_info})
        point_latest(root, tag)
        prune(root, keep_last=keep_last)
    dist.barrier()  # nobody exits (or gets killed) believing the save done before the marker exists
    log.info("saved checkpoint %s in %.1f s", root / tag, time.perf_counter() - started)
    return root / tag


def load(engine: Any, plan: ResumePlan) -> dict:
    """Load weights, optimizer, scheduler into the engine; return our client state."""
    import torch.distributed as dist

    tag_dir = plan.tag_dir
    if plan.universal:
        if dist.get_rank() == 0:
            convert_to_universal(tag_dir)
        dist.barrier()
        tag_dir = tag_dir.with_name(f"{tag_dir.name}_universal")
        if not (tag_dir / COMPLETE).is_file():
            raise CheckpointError(f"universal conversion of '{plan.tag_dir}' did not complete; see rank 0's log")
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load '{tag_dir}'; the files are missing or unreadable")
    return client_state or {}
