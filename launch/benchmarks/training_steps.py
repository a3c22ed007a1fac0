"""Training steps the suites time: a plain PyTorch AdamW step, and the trainer's own through DeepSpeed.

Both compute the task's loss (``pipeline.tasks``: fp32 cross-entropy with label smoothing for
classification, the masked-pixel loss of MAE or SimMIM for ``train.objective=mae|simmim``); the
plain one does backward, clipping, AdamW and the LR schedule by hand, the other is
``pipeline.train_step.TrainStep``, the very step the trainer runs. With a ``clock``, each step
also records the seconds of its two phases, forward+backward and the optimizer (``step.phases``).
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.config import Config, load_config
from pipeline.tasks import build_task


def train_config(size: str, *, batch_size: int, precision: str, zero_stage: int = 0, image_size: int | None = None,
                 activation_checkpointing: str = "none", objective: str = "classification",
                 extra: list[str] | None = None) -> Config:
    """A full Config for a benchmark step (the model of ``size``, at ``image_size`` if given; MAE's
    decoder and SimMIM's masks at their defaults: HF's 8 x 512 decoder, mask ratios 0.75 and 0.6)."""
    image = [f"model.image_size={image_size}"] if image_size else []  # else the size's own (224, tiny 16)
    if objective == "simmim":  # decoder stride = the patch; the paper's 32-pixel blocks where they tile
        model = load_config(None, [f"model.size={size}", *image]).model
        patch = model.patch_hw[0]
        image.append(f"model.encoder_stride={patch}")
        if 32 % patch or any(side % 32 for side in model.image_hw):
            image.append(f"model.mask_patch_size={patch}")
    return load_config(None, [f"model.size={size}", *image,
                              f"model.activation_checkpointing={activation_checkpointing}",
                              f"data.batch_size={batch_size}", f"train.precision={precision}",
                              f"train.zero_stage={zero_stage}", f"train.objective={objective}",
                              "optim.warmup_steps=0", "train.progress_bar=false", *(extra or [])])


def synthetic_batch(cfg: Config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    images = torch.randn(cfg.data.batch_size, m.num_channels, *m.image_hw, generator=g)
    labels = torch.randint(0, m.num_labels, (cfg.data.batch_size,), generator=g)
    return images, labels


def build_seeded_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # every contender starts from the same weights
    return build_task(cfg).build_model(cfg.model)


def plain_step(cfg: Config, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               *, clock: Callable[[], float] | None = None) -> Callable[[], float]:
    """A plain PyTorch step: autocast forward (bf16), backward, clip, torch AdamW, LR schedule."""
    from pipeline.optim import build_optimizer, build_scheduler

    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    use_autocast = cfg.train.precision == "bf16"

    task = build_task(cfg)
    batch = {"image": images, "label": labels}
    phases = Phases(clock)

    def step() -> float:
        phases.start()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            loss = task.loss(model, batch)  # the trainer's loss, without DeepSpeed around it
        loss.backward()
        phases.split()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        phases.stop()
        return loss.item()

    step.optimizer = optimizer  # type: ignore[attr-defined]
    step.phases = phases.seconds  # type: ignore[attr-defined]
    return step


class Phases:
    """(forward+backward, optimizer) seconds of each step by ``clock``; nothing without one."""

    def __init__(self, clock: Callable[[], float] | None):
        self.clock, self.seconds = clock, []
        self.marks: list[float] = []

    def start(self) -> None:
        if self.clock:
            self.marks = [self.clock()]

    def split(self) -> None:
        if self.clock:
            self.marks.append(self.clock())

    def stop(self) -> None:
        if self.clock:
            start, middle, end = *self.marks, self.clock()
            self.seconds.append((middle - start, end - middle))


def quiet_deepspeed() -> None:
    """DeepSpeed on CPU: no accelerator warning, no per-engine banners."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=".*is deprecated.*")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def single_process_group() -> bool:
    """torch.distributed for this one process (world size 1, a free port), as the trainer starts it;
    True when this call created it."""
    import torch.distributed as dist

    from pipeline.distributed.engine import init_process_group
    from pipeline.distributed.env import resolve_env

    quiet_deepspeed()
    if dist.is_initialized():
        return False
    init_process_group(resolve_env({}), timeout_s=300)
    return True


def engine_step(cfg: Config, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                *, world_size: int = 1, clock: Callable[[], float] | None = None):
    """The trainer's own step (``TrainStep``) through our DeepSpeed engine; returns (step, engine).

    ``step(after_backward)`` calls ``after_backward()`` between the backward pass and the
    optimizer step, where gradients, weights and optimizer states all exist."""
    from pipeline.distributed.ema import build_ema
    from pipeline.distributed.engine import build_engine
    from pipeline.distributed.precision import engine_dtype
    from pipeline.train_step import TrainStep

    torch_linear = F.linear
    engine = build_engine(model, cfg, world_size=world_size)
    # A ZeRO-3 engine replaces torch.nn.functional.linear for the whole process (DeepSpeed's
    # memory_efficient_linear), which slows every other contender (docs/DECISIONS.md, Benchmarks):
    # each contender gets its own, the engine's inside its step and torch's elsewhere.
    engine_linear = F.linear
    F.linear = torch_linear
    engine.train()
    ema = build_ema(engine, cfg.train)  # with train.ema_decay, updated in every step as the trainer's is
    train_step = TrainStep(engine, build_task(cfg), cfg, torch.device("cpu"), ema=ema)
    batch = {"image": images.to(engine_dtype(cfg.train)), "label": labels}
    phases = Phases(clock)

    def step(after_backward: Callable[[], None] | None = None) -> float:
        F.linear = engine_linear
        try:
            phases.start()
            loss = train_step.micro(batch)
            phases.split()
            if after_backward is not None:  # e.g. to count memory while the gradients exist
                after_backward()
            train_step.step()
            phases.stop()
            return loss.item()
        finally:
            F.linear = torch_linear

    step.phases = phases.seconds  # type: ignore[attr-defined]
    step.ema = ema  # type: ignore[attr-defined]
    return step, engine
