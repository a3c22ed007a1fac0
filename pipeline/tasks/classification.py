"""Supervised image classification: the ViT with HF's classifier on the CLS token."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.model import ViTForImageClassification, vit_flops
from pipeline.model.losses import classification_loss
from pipeline.tasks.base import ENCODER_SHAPE_FIELDS, Task


class ClassificationTask(Task):
    name = "classification"
    sample_keys = ("cls",)
    shape_fields = (*ENCODER_SHAPE_FIELDS, "num_labels")
    eval_names = ("correct_top1", "correct_top5", "loss_sum", "count")

    def __init__(self, *, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        return ViTForImageClassification(model_cfg)

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        logits = model(batch["image"]).logits  # (batch, num_labels)
        return classification_loss(logits, batch["label"], label_smoothing=self.label_smoothing)

    def eval_sums(self, model: nn.Module, batch: dict) -> Tensor:
        logits = model(batch["image"]).logits.float()
        labels, valid = batch["label"], batch["valid"]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (batch, 5)
        hits = top == labels[:, None]
        # Padding carries label -100, which cross_entropy ignores: its loss is 0, masked anyway.
        losses = classification_loss(logits, labels, reduction="none")
        return torch.stack([(hits[:, 0] & valid).sum(), (hits.any(-1) & valid).sum(),
                            (losses * valid).sum(), valid.sum()]).double()

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(1.0, sums["count"])
        return {"val_top1": sums["correct_top1"] / count, "val_top5": sums["correct_top5"] / count,
                "val_loss": sums["loss_sum"] / count, "val_samples": int(sums["count"])}

    def flops(self, model_cfg: ModelConfig, batch_size: int) -> float:
        return vit_flops(model_cfg, batch_size)
