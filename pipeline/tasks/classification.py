"""Supervised image classification: the ViT with HF's classifier on the CLS token."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import DataConfig, ModelConfig
from pipeline.model import ViTForImageClassification, vit_flops
from pipeline.model.losses import classification_loss, soft_target_loss
from pipeline.tasks.base import ENCODER_SHAPE_FIELDS, Task
from pipeline.tasks.batch_augment import BatchAugment


class ClassificationTask(Task):
    name = "classification"
    sample_keys = ("cls",)
    shape_fields = (*ENCODER_SHAPE_FIELDS, "num_labels")
    eval_names = ("correct_top1", "correct_top5", "loss_sum", "count")

    def __init__(self, *, label_smoothing: float = 0.0, data: DataConfig | None = None, num_labels: int = 0,
                 seed: int = 0):
        self.label_smoothing = label_smoothing
        # data.reprob / mixup / cutmix: erasing and mixing of training batches on the device
        self.augment = (BatchAugment(data, num_classes=num_labels, label_smoothing=label_smoothing, seed=seed)
                        if data is not None and BatchAugment.wanted(data) else None)

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        return ViTForImageClassification(model_cfg)

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        images, targets = batch["image"], None
        if self.augment is not None:
            rank = dist.get_rank() if dist.is_initialized() else 0
            images, targets = self.augment(images, batch["label"], batch, rank)
        logits = model(images).logits  # (batch, num_labels)
        if targets is not None:  # mixed: soft targets, label smoothing already folded in
            return soft_target_loss(logits, targets)
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
