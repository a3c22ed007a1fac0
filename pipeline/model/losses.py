"""The losses of the model heads, one definition each (heads, tasks and benchmarks call these)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0,
                        reduction: str = "mean") -> Tensor:
    """Cross-entropy in fp32 whatever the compute precision: a bf16 log-softmax loses the small terms.

    logits (batch, num_labels), labels (batch,) class indices; -100 is ignored (padding)."""
    return F.cross_entropy(logits.float(), labels.to(logits.device), label_smoothing=label_smoothing,
                           reduction=reduction)


def soft_target_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against soft targets (mixup/cutmix with label smoothing folded in), in fp32:
    the mean over the batch of -sum(targets * log_softmax(logits)), timm's SoftTargetCrossEntropy.

    logits (batch, num_labels), targets (batch, num_labels), rows summing to 1."""
    return (-targets.to(logits.device, torch.float32) * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
