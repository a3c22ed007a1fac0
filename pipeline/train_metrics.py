"""The figures of a metrics row: gathered between two rows, read on the host only when a row is written.

Losses, their count and the per-step "some loss was not finite" flags accumulate on the device:
reading them is a host-device synchronisation, allowed on logging steps only. Times are the
host's wall clock; a window spans whole steps and ends with that synchronisation, so its
elapsed time is the device's too.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist


class StepWindow:
    def __init__(self, device: torch.device, max_steps: int):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)
        # 1.0 where some micro-batch of the window's step i had a non-finite loss
        self.nonfinite = torch.zeros(max_steps, dtype=torch.float32, device=device)
        self.grad_norm: torch.Tensor | None = None  # pre-clipping, the window's last step (ZeRO-0 only)
        self.steps = 0
        self.elapsed = 0.0
        self.data_wait = 0.0
        self._step_start = time.perf_counter()

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss (detached); a non-finite one flags the step and is left out of the mean."""
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.double(), 0.0)
        self.loss_count += finite
        self.nonfinite[self.steps] = torch.maximum(self.nonfinite[self.steps], (~finite).float())

    def end_step(self) -> None:
        now = time.perf_counter()
        self.elapsed += now - self._step_start
        self._step_start = now
        self.steps += 1

    def reduce(self) -> tuple[float, int]:
        """(mean loss over every rank's finite losses, steps with a non-finite loss on some rank).

        Collective: every rank calls it at the same step."""
        sums = torch.stack([self.loss_sum, self.loss_count])
        flags = self.nonfinite[:self.steps].clone()
        dist.all_reduce(sums)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_sum, count = sums.tolist()
        return (loss_sum / count if count > 0 else float("nan")), int(flags.sum().item())


def train_row(window: StepWindow, *, loss: float, images_per_step: int, flops_per_step: float,
              peak_flops: float, lr: float, grad_norm: float | None, **counters: Any) -> dict[str, Any]:
    """The metrics row of a window: throughput, MFU (analytic FLOPs over the device's peak), data wait."""
    elapsed = window.elapsed
    step_time = elapsed / max(1, window.steps)
    return {
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "samples_per_s": window.steps * images_per_step / elapsed if elapsed > 0 else 0.0,
        "data_wait_fraction": window.data_wait / elapsed if elapsed > 0 else 0.0,
        "step_time_s": step_time,
        "mfu": flops_per_step / step_time / peak_flops if step_time > 0 else 0.0,
        **counters,
    }
