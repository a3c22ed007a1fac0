"""What MAE and SimMIM share as tasks: no labels, random masks on the device, a reconstruction loss.

The masks of a training batch are a pure function of (train.seed, rank, epoch, the batch's number
in the epoch): a generator on the batch's device is reseeded with those before each batch (on the
host, no synchronisation; the draws happen on the device). The data stream gives a resumed run
exactly the same batches, so it gets exactly the same masks, whatever else has drawn from torch's
global generators meanwhile (DataLoader iterators take a seed from it each time they start, which
a resumed run does at another point than an uninterrupted one). A batch without those fields (a
benchmark's synthetic batch) draws from the device's default generator instead. Evaluation uses a
generator of its own, reseeded before every pass: every evaluation scores the same masks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.data.partition import mix_seed
from pipeline.tasks.base import Task


def device_generator(device: torch.device) -> torch.Generator:
    """The default generator of ``device``: the one ``torch.rand(..., device=device)`` draws from."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class MaskedImageTask(Task):
    sample_keys = ()  # pixels are the targets: shards with or without .cls
    # Reconstruction error summed over the masked units of real samples, the number of those units
    # (patches for MAE, pixels for SimMIM), and the number of real samples.
    eval_names = ("loss_sum", "masked", "count")
    has_features = True

    def __init__(self, model_cfg: ModelConfig, *, seed: int = 0):
        self.model_cfg, self.seed = model_cfg, seed
        self.eval_generator: torch.Generator | None = None
        self.train_generator: torch.Generator | None = None

    def masks_generator(self, batch: dict) -> torch.Generator:
        """The generator a training batch's masks are drawn from, seeded for this very batch."""
        device = batch["image"].device
        if "epoch" not in batch or "index" not in batch:
            return device_generator(device)
        if self.train_generator is None or self.train_generator.device != device:
            self.train_generator = torch.Generator(device=device)
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.train_generator.manual_seed(mix_seed(self.seed, "masks", rank, int(batch["epoch"]), int(batch["index"])))
        return self.train_generator

    def start_eval(self, device: torch.device) -> None:
        self.eval_generator = torch.Generator(device=device)
        self.eval_generator.manual_seed(mix_seed(self.seed, "eval-masks"))

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        # Every sample has the same number of masked units, so this is also the mean of the
        # per-sample losses: the training loss's definition, over the whole validation set.
        return {"val_loss": sums["loss_sum"] / max(1.0, sums["masked"]), "val_samples": int(sums["count"])}

    def features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        return getattr(model, "module", model).encoder_features(images)  # the engine's model, or a bare one

    def _eval_generator(self, device: torch.device) -> torch.Generator:
        if self.eval_generator is None or self.eval_generator.device != device:
            self.start_eval(device)
        return self.eval_generator


def sums(loss_sum: Tensor, masked: Tensor, valid: Tensor) -> Tensor:
    """The float64 row of ``MaskedImageTask.eval_names``."""
    return torch.stack([loss_sum.double(), masked.double(), valid.sum().double()])
