"""AdamW parameter groups and the learning-rate schedule (linear warmup, then cosine or constant)."""
from __future__ import annotations

import math

import torch

from pipeline.config import OptimConfig

# Parameters that are not weights of a matmul: decaying them pulls them to zero for no reason
# (the ViT paper's and timm's practice).
NO_DECAY_NAMES = ("cls_token", "position_embeddings", "mask_token")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matmul/conv weights, and undecayed biases, norms, tokens, positions."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or any(token in name for token in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch's fused AdamW (one kernel per tensor, on CUDA and on CPU); passed to DeepSpeed as a
    client optimizer. On CPU too: the default path makes eight passes over ZeRO's flat partitions
    where the fused kernel makes one (docs/DECISIONS.md, Optimizer)."""
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"}  # where torch has the fused kernel; elsewhere torch's default
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
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
    bring an old schedule (old max_steps, old lr) back on resume; a function's it leaves alone."""
    schedule = WarmupCosine(cfg, total_steps)

    def lr_multiplier(step: int) -> float:
        return schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)


def apply_current_schedule(scheduler, cfg: OptimConfig) -> None:
    """After loading a checkpoint: the config's LR and schedule win over the saved ones.

    On an unchanged config this recomputes the very values that were saved."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [cfg.lr for _ in groups]
    for group, base_lr, multiplier in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
