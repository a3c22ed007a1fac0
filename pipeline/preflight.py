"""Everything the user gave, checked on every rank before the process group starts.

A refusal here is the same on every rank and comes before any rank waits for another, so it is
always the one-line error with exit 2: checked later, one rank's refusal became the other ranks'
"Gloo connectFullMesh failed" traceback, or a 30-minute wait, depending on timing. Checked:

- ``train.output_dir`` can be created and written (storage.py), and its free space, with a
  warning when it holds less than two checkpoints (``checkpoint_bytes``);
- ``checkpoint.resume``: the path exists and holds a complete checkpoint that this model, ZeRO
  stage and world size can load (checkpoint.py's own checks, run early);
- the shards: every local shard exists and every shard's sample count is known (sources.py);
- a resume on another world size: the global batch the checkpoint trained with, kept by
  adjusting ``train.grad_accum_steps`` where ``data.keep_global_batch`` asks for it
  (``resume_global_batch``; the one place a resume changes the config, before it is written out).

The trainer takes the result (the resume plan, the resolved shards); built without one (tests),
it runs ``preflight`` itself.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline import checkpoint
from pipeline.config import Config, ConfigError, ModelConfig
from pipeline.data.elastic import keep_global_batch_accum
from pipeline.data.remote import IoOptions
from pipeline.data.sources import Shard, resolve_shards
from pipeline.distributed.env import DistributedEnv
from pipeline.optim import optim_groups
from pipeline.storage import check_writable

log = logging.getLogger(__name__)

ADAM_STATE_BYTES = 8  # two fp32 moments per parameter


@dataclass(frozen=True)
class Preflight:
    resume: checkpoint.ResumePlan | None
    train_shards: list[Shard]
    val_shards: list[Shard] | None
    checkpoint_bytes: int  # the estimated size of one checkpoint, all ranks together


def preflight(cfg: Config, env: DistributedEnv, *, shape_fields: tuple[str, ...],
              build_model: Callable[[ModelConfig], nn.Module]) -> Preflight:
    """Refuse (UserError, exit 2) whatever of the user's input cannot work; warn on low space.
    ``shape_fields`` and ``build_model`` are the task's (``Task.shape_fields``, ``Task.build_model``)."""
    output_dir = Path(cfg.train.output_dir)
    check_writable(output_dir)
    resume_dir = checkpoint.resolve_resume(cfg.checkpoint.resume, output_dir, overwrite=cfg.checkpoint.overwrite)
    plan = checkpoint.plan_resume(resume_dir, model_config=dataclasses.asdict(cfg.model),
                                  world_size=env.world_size, zero_stage=cfg.train.zero_stage,
                                  shape_fields=shape_fields, objective=cfg.train.objective,
                                  optim_groups=optim_groups(cfg.optim))
    if plan is not None:
        resume_global_batch(cfg, plan.marker, world_size=env.world_size, report=env.is_main)
    io = IoOptions.from_config(cfg.data)  # remote shards: HEAD-checked here, before the process group
    train = resolve_shards(cfg.data.train_shards, cfg.data.manifest, what="data.train_shards", io=io)
    val = resolve_shards(cfg.data.val_shards, cfg.data.manifest, what="data.val_shards", io=io) \
        if cfg.data.val_shards else None
    size = checkpoint_bytes(count_parameters(build_model, cfg.model), zero_stage=cfg.train.zero_stage,
                            precision=cfg.train.precision)
    if env.is_main:
        warn_if_low_space(output_dir, size)
    return Preflight(resume=plan, train_shards=train, val_shards=val, checkpoint_bytes=size)


def resume_global_batch(cfg: Config, marker: dict, *, world_size: int, report: bool = True) -> None:
    """The checkpoint's global batch against this run's. With ``data.keep_global_batch``, set
    ``train.grad_accum_steps`` to keep it, or refuse in one line where it cannot be kept; without,
    say what changed. Either way the LR schedule goes on counting optimizer steps."""
    saved = marker.get("global_batch")
    accum = cfg.train.grad_accum_steps
    ours = cfg.data.batch_size * accum * world_size
    if cfg.data.keep_global_batch and (saved is not None or marker.get("world_size") != world_size):
        if saved is None:
            raise ConfigError("data.keep_global_batch=true, but the checkpoint does not record its global batch "
                              "(saved by an older version); set train.grad_accum_steps yourself and "
                              "data.keep_global_batch=false")
        kept = keep_global_batch_accum(int(saved), batch_size=cfg.data.batch_size, world_size=world_size)
        if kept is None:
            raise ConfigError(f"data.keep_global_batch=true: the checkpoint's global batch {saved} is not a multiple "
                              f"of data.batch_size {cfg.data.batch_size} x {world_size} ranks; resume on a world size "
                              f"that divides it, change data.batch_size, or set data.keep_global_batch=false")
        if kept != accum and report:
            log.warning("data.keep_global_batch: train.grad_accum_steps %d -> %d keeps the global batch at %d on %d "
                        "ranks (was %d ranks)", accum, kept, saved, world_size, marker.get("world_size"))
        cfg.train.grad_accum_steps = kept
    elif saved is not None and int(saved) != ours and report:
        log.warning("the global batch changes from %d to %d (%d -> %d ranks x data.batch_size %d x "
                    "train.grad_accum_steps %d); the LR schedule goes on counting optimizer steps from the "
                    "checkpoint's step. data.keep_global_batch=true keeps the global batch instead", int(saved), ours,
                    marker.get("world_size"), world_size, cfg.data.batch_size, accum)


def count_parameters(build_model: Callable[[ModelConfig], nn.Module], model_cfg: ModelConfig) -> int:
    """The model's parameter count, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    return sum(p.numel() for p in model.parameters())


def checkpoint_bytes(num_params: int, *, zero_stage: int, precision: str) -> int:
    """What one DeepSpeed checkpoint of an Adam-trained model holds, per parameter:

    - the weights in the engine's dtype, in the model-states file (ZeRO 0-2; ZeRO-3 keeps none
      there): 2 bytes at ZeRO 1-2 in bf16/fp16, else 4 (bf16 at ZeRO-0 trains fp32 weights);
    - an fp32 master copy in the optimizer states: ZeRO 1-3, and fp16 at ZeRO-0;
    - Adam's two fp32 moments.
    """
    low = precision in ("bf16", "fp16")
    weights = 0 if zero_stage == 3 else (2 if low and zero_stage > 0 or precision == "fp16" else 4)
    master = 4 if zero_stage > 0 or precision == "fp16" else 0
    return num_params * (weights + master + ADAM_STATE_BYTES)


def warn_if_low_space(output_dir: Path, one_checkpoint: int) -> None:
    """A save needs room for a new checkpoint while the previous one is still there."""
    free = shutil.disk_usage(output_dir).free
    if free < 2 * one_checkpoint:
        log.warning("train.output_dir '%s' has %.1f MB free, less than two checkpoints (about %.1f MB each): a "
                    "save may fill the disk; free space or lower checkpoint.keep_last", output_dir, free / 1e6,
                    one_checkpoint / 1e6)
