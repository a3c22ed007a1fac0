"""The losses of the model heads, one definition each (heads, tasks and benchmarks call these)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0,
                        reduction: str = "mean") -> Tensor:
    """Cross-entropy in fp32 whatever the compute precision: a bf16 log-softmax loses the small terms.

    logits (batch, num_labels), labels (batch,) class indices; -100 is ignored (padding)."""
    return F.cross_entropy(logits.float(), labels.to(logits.device), label_smoothing=label_smoothing,
                           reduction=reduction)
