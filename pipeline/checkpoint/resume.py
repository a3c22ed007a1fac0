"""Resuming: which checkpoint (``checkpoint.resume``), whether it fits this run, and loading it
(through DeepSpeed's universal format when the data-parallel size changed).
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checkpoint.store import (COMPLETE, UNIVERSAL_SUFFIX, CheckpointError, _atomic_write, checkpoint_root,
                                       find_checkpoint, fsync_tree, is_complete, latest_complete, read_marker,
                                       remove_checkpoint, step_of, universal_dir)

log = logging.getLogger(__name__)

# Model fields that may differ on resume without a refusal (logged when they do).
FREE_FIELDS = ("size", "activation_checkpointing", "hidden_dropout_prob", "attention_probs_dropout_prob",
               "drop_path_rate")  # regularization: no shape, free to change on resume


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
    return find_checkpoint(resume, what="checkpoint.resume")


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


def plan_resume(tag_dir: Path | None, *, model_config: dict, zero_stage: int, world_size: int,
                shape_fields: tuple[str, ...], objective: str | None = None,
                optim_groups: dict | None = None) -> ResumePlan | None:
    """Check a checkpoint against this run before any weights are touched; ``shape_fields`` are the
    model fields the task's weights depend on (``Task.shape_fields``). The objective comes first:
    another objective's weights differ in more than shape, and naming its fields would send the
    user round in circles."""
    if tag_dir is None:
        return None
    marker = read_marker(tag_dir)
    saved_model = marker.get("model", {})
    saved_task = marker.get("task", "classification")
    if objective is not None and saved_task != objective:
        raise CheckpointError(
            f"checkpoint '{tag_dir}' was trained with train.objective={saved_task}, not {objective}: resume it "
            f"with train.objective={saved_task}, or start {objective} from its encoder with "
            f"train.init_from={tag_dir} and another train.output_dir")

    def differs(key: str) -> bool:
        return key in saved_model and saved_model[key] != model_config.get(key)

    mismatched = [f"model.{key} (checkpoint {saved_model[key]!r}, config {model_config.get(key)!r})"
                  for key in shape_fields if differs(key)]
    if mismatched:
        raise CheckpointError(f"checkpoint '{tag_dir}' was saved with another model shape: {'; '.join(mismatched)}; "
                              "set these fields as the checkpoint has them, or use another train.output_dir")
    changed = [key for key in saved_model if key not in (*shape_fields, *FREE_FIELDS) and differs(key)]
    if changed:
        log.warning("resuming %s with changed model fields: %s", tag_dir.name,
                    ", ".join(f"{k} {saved_model[k]!r} -> {model_config.get(k)!r}" for k in changed))
    if marker.get("zero_stage") != zero_stage:
        raise CheckpointError(f"checkpoint '{tag_dir}' was saved with ZeRO-{marker.get('zero_stage')} but "
                              f"train.zero_stage={zero_stage}; resume with train.zero_stage={marker.get('zero_stage')}")
    refuse_other_groups(tag_dir, marker.get("optim_groups"), optim_groups)
    universal = marker.get("world_size") != world_size and zero_stage > 0
    return ResumePlan(tag_dir=tag_dir, marker=marker, universal=universal)


def refuse_other_groups(tag_dir: Path, saved: dict | None, config: dict | None) -> None:
    """optim.layer_decay makes the optimizer's parameter groups and puts each group's LR scale in the
    optimizer state: another value would not load (layer decay on or off: DeepSpeed's flat groups
    differ) or would load the old scales silently (another factor). Checkpoints older than this
    record (no "optim_groups") are not checked."""
    if saved is None or config is None:
        return
    for key in sorted(set(saved) | set(config)):
        was, now = (("null" if v is None else v) for v in (saved.get(key), config.get(key)))  # as YAML writes None
        if was != now:
            raise CheckpointError(
                f"checkpoint '{tag_dir}' was saved with optim.{key}={was} but the config has optim.{key}={now}: the "
                f"optimizer's parameter groups and their LR scales are in its state; resume with optim.{key}={was}, "
                f"or start from its weights with train.init_from={tag_dir} and another train.output_dir")


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
    from pipeline.checkpoint.read import faster_reads, materialized

    with faster_reads(engine):  # same result as DeepSpeed's reads, in about half the time
        path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load '{tag_dir}'; the files are missing or unreadable")
    client_state = dict(client_state or {})
    client_state.pop("optimizer", None)  # DeepSpeed's (ZeRO-0): already inside the engine, already copied
    return materialized(client_state)  # nothing we keep refers to the checkpoint's files
