"""AdamW parameter groups (weight decay, MAE's layer-wise LR decay) and the learning-rate schedule
(linear warmup, then cosine or constant)."""
from __future__ import annotations

import dataclasses
import logging
import math
import re

import torch

from pipeline.config import Config, ConfigError, OptimConfig

log = logging.getLogger(__name__)

# Parameters that are not weights of a matmul: decaying them pulls them to zero for no reason
# (the ViT paper's and timm's practice).
NO_DECAY_NAMES = ("cls_token", "position_embeddings", "mask_token")


# HF's names for what MAE's get_layer_id_for_vit calls cls_token/pos_embed/patch_embed (id 0) and
# blocks.{i} (id i + 1), under any prefix (vit., the MAE model's, ...). MAE's decoder is
# decoder.decoder_layers.{i}: not "encoder.layer", so it falls with the rest (id L + 1).
_ENCODER_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)embeddings\.")


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    return not (param.ndim <= 1 or any(token in name for token in NO_DECAY_NAMES))


def encoder_depth(model: torch.nn.Module) -> int:
    """L, the number of encoder layers, read from the parameter names (encoder.layer.{i}.*)."""
    found = [int(m.group(1)) for name, _ in model.named_parameters() if (m := _ENCODER_LAYER.search(name))]
    return max(found) + 1 if found else 0


def layer_id(name: str, depth: int) -> int:
    """MAE's layer id on HF names: embeddings.* 0, encoder.layer.{i}.* i + 1, the rest depth + 1."""
    if match := _ENCODER_LAYER.search(name):
        return int(match.group(1)) + 1
    if _EMBEDDINGS.search(name):
        return 0
    return depth + 1


def param_groups(model: torch.nn.Module, weight_decay: float, *, layer_decay: float | None = None,
                 lr: float = 1.0) -> list[dict]:
    """AdamW's groups. No weight decay on 1-D parameters (biases, norms) nor on the CLS token, the
    position embeddings and the mask token; decay on the matmul/conv weights.

    Without ``layer_decay``: those two groups, as always. With it, MAE's layer-wise LR decay
    (``util/lr_decay.py``, from BEiT): one group per (layer id, decayed or not), each with
    ``lr_scale = layer_decay ** (L + 1 - id)`` and its own ``lr = lr * lr_scale``, which the LR
    scheduler takes as that group's base LR. Groups come in descending scale, so the first one
    (whose LR the logs show) follows the schedule itself.
    """
    if layer_decay is None:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (decay if _decays(name, param) else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    depth = encoder_depth(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid, decays = layer_id(name, depth), _decays(name, param)
        if (lid, decays) not in groups:
            scale = layer_decay ** (depth + 1 - lid)
            groups[lid, decays] = {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                   "lr_scale": scale, "lr": lr * scale,
                                   "name": f"layer_{lid}_{'decay' if decays else 'no_decay'}"}
        groups[lid, decays]["params"].append(param)
    return sorted(groups.values(), key=lambda group: -group["lr_scale"])


def optim_groups(cfg: OptimConfig) -> dict:
    """What of the optimizer config shapes its parameter groups (kept in a checkpoint's marker; a
    resume with other values is refused, see ``checkpoint.plan_resume``)."""
    return {"layer_decay": cfg.layer_decay}


def optimizer_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """The config's groups: ``param_groups`` with optim.weight_decay, optim.layer_decay, optim.lr."""
    return param_groups(model, cfg.weight_decay, layer_decay=cfg.layer_decay, lr=cfg.lr)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch's fused AdamW (one kernel per tensor, on CUDA and on CPU); passed to DeepSpeed as a
    client optimizer. On CPU too: the default path makes eight passes over ZeRO's flat partitions
    where the fused kernel makes one (docs/DECISIONS.md, Optimizer)."""
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"}  # where torch has the fused kernel; elsewhere torch's default
    return torch.optim.AdamW(optimizer_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused or None)


class WarmupCosine:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): warmup, then decay to min_lr."""

    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps

    def __call__(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """LambdaLR over a plain function: LambdaLR saves the state of callable *objects* and would
    bring an old schedule (old max_steps, old lr) back on resume; a function's it leaves alone.

    LambdaLR multiplies each group's own initial LR, so layer decay's per-group scales survive.
    (DeepSpeed's config schedulers, WarmupLR among them, would set every group to one LR,
    DeepSpeed #7303; engine.py refuses a deepspeed.scheduler section.)"""
    schedule = WarmupCosine(cfg, total_steps)

    def lr_multiplier(step: int) -> float:
        return schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)


def apply_current_schedule(scheduler, cfg: OptimConfig) -> None:
    """After loading a checkpoint: the config's LR and schedule win over the saved ones.

    On an unchanged config this recomputes the very values that were saved."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [cfg.lr * group.get("lr_scale", 1.0) for group in groups]
    for group, base_lr, multiplier in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)


def schedule_needs_samples(cfg: Config) -> bool:
    """Does the run's length depend on the training set's size (train.epochs, optim.warmup_epochs)?"""
    return cfg.train.epochs is not None or cfg.optim.warmup_epochs is not None


def resolve_schedule(cfg: Config, *, world_size: int, num_samples: int | None = None) -> Config:
    """The config with epochs turned into steps and blr into lr, as MAE's and DeiT's scripts do.

    An epoch is what the loader makes of one: ``num_samples // (data.batch_size x world size)``
    batches per rank (the remainder waits for the next epoch), ``train.grad_accum_steps`` of them per
    optimizer step. ``lr = blr x global batch / blr_batch``. A value given beside the one it is
    derived from must agree with it (a resolved run's config.yaml holds both), else one line says
    which to drop. Idempotent: the trainer and ``--check`` may both call it.
    """
    train, optim = cfg.train, cfg.optim
    micro, accum = cfg.data.batch_size, train.grad_accum_steps
    global_batch = micro * accum * world_size
    said = []
    if schedule_needs_samples(cfg):
        if num_samples is None:
            raise ValueError("resolve_schedule needs num_samples for train.epochs / optim.warmup_epochs")
        batches = num_samples // (micro * world_size)  # per rank and epoch
        if batches < accum:
            raise ConfigError(f"an epoch of data.train_shards ({num_samples} samples) is shorter than one optimizer "
                              f"step of {global_batch} images; lower data.batch_size or use train.max_steps")
        per_epoch = batches / accum
        if train.epochs is not None:
            steps = train.epochs * batches // accum
            _agree("train.max_steps", train.max_steps, steps, f"train.epochs={train.epochs}")
            train = dataclasses.replace(train, max_steps=steps)
            said.append(f"{train.epochs} epochs = {steps} steps")
        if optim.warmup_epochs is not None:
            warmup = round(optim.warmup_epochs * per_epoch)
            _agree("optim.warmup_steps", optim.warmup_steps or None, warmup, f"optim.warmup_epochs={optim.warmup_epochs}")
            optim = dataclasses.replace(optim, warmup_steps=warmup)
            said.append(f"warmup {optim.warmup_epochs} epochs = {warmup} steps")
        said.append(f"{per_epoch:g} steps per epoch of {num_samples} samples")
    if optim.blr is not None:
        lr = optim.blr * global_batch / optim.blr_batch
        if optim.lr is not None and not math.isclose(optim.lr, lr, rel_tol=1e-9):
            _agree("optim.lr", optim.lr, lr, f"optim.blr={optim.blr} x {global_batch} / {optim.blr_batch}")
        optim = dataclasses.replace(optim, lr=lr)
        said.append(f"lr {lr:.4g} = blr {optim.blr:g} x global batch {global_batch} / {optim.blr_batch}")
    if not said:
        return cfg
    log.info("schedule: %s", "; ".join(said))
    return dataclasses.replace(cfg, train=train, optim=optim)


def _agree(key: str, given, derived, source: str) -> None:
    if given is not None and given != derived:
        raise ConfigError(f"{key}={given} and {source} (= {derived} here) are both given; give one of them")
