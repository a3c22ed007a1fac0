"""One optimizer step through the DeepSpeed engine: the step the trainer, the benchmarks and the tests share.

Nothing here reads a device value on the host: the losses stay on the device, and a step whose
loss or gradients are not finite is skipped on the device too. At ZeRO 1-3 and with fp16,
DeepSpeed's optimizer checks the gradients itself and skips such a step on every rank. At
ZeRO-0 with our AdamW it would not, so the step computes the gradient norm (and clips) itself
and hands fused AdamW a ``found_inf`` flag, the mechanism torch's GradScaler uses: the update is
skipped inside the kernel, without a round trip to the host.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.distributed.ema import WeightEma
from pipeline.distributed.engine import step_clips_gradients
from pipeline.distributed.precision import autocast_context
from pipeline.tasks import Task


def _skips_on_device(optimizer: Any) -> bool:
    """torch's fused Adam/AdamW read ``found_inf`` and skip their update when it is 1."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


class TrainStep:
    """``micro(batch)`` per micro-batch (forward and backward), then ``step()`` once per optimizer step."""

    def __init__(self, engine: Any, task: Task, cfg: Config, device: torch.device, ema: WeightEma | None = None):
        self.engine, self.task, self.cfg, self.device = engine, task, cfg, device
        self.ema = ema  # updated after every optimizer step
        self.guards = step_clips_gradients(cfg.train)
        if self.guards and not _skips_on_device(engine.optimizer):
            raise RuntimeError("ZeRO-0 needs torch's fused AdamW (it skips non-finite steps on the device); "
                               f"the engine has {type(engine.optimizer).__name__}")
        self.max_norm = cfg.optim.grad_clip

    def micro(self, batch: dict) -> Tensor:
        """Forward and backward of one micro-batch; returns its loss (detached, on the device).
        Call ``step()`` after every micro-batch, as DeepSpeed counts micro-steps there."""
        with autocast_context(self.cfg.train, self.device):
            loss = self.task.loss(self.engine, batch)
        self.engine.backward(loss)
        return loss.detach()

    def step(self) -> Tensor | None:
        """After each micro-batch; DeepSpeed applies the optimizer at the accumulation boundary only.

        Returns the pre-clipping gradient norm on the device where this step computed it (ZeRO-0),
        else None (DeepSpeed keeps its own, ``engine.get_global_grad_norm()``)."""
        norm = None
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self.guards and boundary:
            # After the last backward of the step every rank holds the full, averaged gradients.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if self.max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(grads, self.max_norm, norm, foreach=True)
            self.engine.optimizer.found_inf = (~torch.isfinite(norm)).float()
        self.engine.step()
        if boundary and self.ema is not None:
            self.ema.update(self.engine.global_steps)  # the optimizer steps so far, as timm's num_updates
        return norm

    def run(self, batches: list[dict]) -> Tensor:
        """One whole optimizer step over ``batches`` (one per micro-step); the mean loss, on the device."""
        losses = []
        for batch in batches:
            losses.append(self.micro(batch))
            self.step()
        return torch.stack(losses).mean()


@contextlib.contextmanager
def steady_state(device: torch.device, *, warm: bool):
    """A steady-state step's work (the next batch, forward, backward, optimizer). With
    ``PIPELINE_SYNC_DEBUG=warn|error`` on a CUDA device (``make gpu-check``), torch reports (or
    refuses) every host-device synchronisation inside it, once ``warm`` (after the first steps,
    where DeepSpeed and the allocators set themselves up)."""
    mode = os.environ.get("PIPELINE_SYNC_DEBUG")
    if not (warm and mode and device.type == "cuda"):
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
