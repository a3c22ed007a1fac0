"""Analytic FLOPs of a ViT training step, the numerator of MFU (model FLOPs utilisation)."""
from __future__ import annotations

from pipeline.config import ModelConfig


def vit_forward_macs_per_image(cfg: ModelConfig) -> int:
    """Multiply-accumulates of one image's forward pass through ViTForImageClassification.

    Counts the matmuls only: patch embedding, Q/K/V and output projections, attention scores
    (Q K^T) and context (P V), the MLP, and the classifier on the CLS token. LayerNorm, softmax,
    activations and residual adds are elementwise and left out, as is customary for MFU.
    """
    (ph, pw), hidden, inter = cfg.patch_hw, cfg.hidden_size, cfg.intermediate_size
    patches = cfg.num_patches
    tokens = patches + 1  # + CLS
    patch_embed = patches * (cfg.num_channels * ph * pw) * hidden
    per_layer = (
        3 * tokens * hidden * hidden  # query, key, value
        + tokens * tokens * hidden  # scores: every head's (tokens x head_dim) @ (head_dim x tokens)
        + tokens * tokens * hidden  # context: probs @ values
        + tokens * hidden * hidden  # attention output projection
        + 2 * tokens * hidden * inter  # MLP up and down
    )
    head = hidden * cfg.num_labels  # classifier on the CLS token only
    return patch_embed + cfg.num_hidden_layers * per_layer + head


def vit_flops(cfg: ModelConfig, batch_size: int) -> float:
    """Training FLOPs of one step on ``batch_size`` images: forward = 2 * MACs, training = 3 * forward.

    The backward pass is taken as twice the forward (gradients for inputs and for weights); the
    recomputation of activation checkpointing is not counted, so MFU stays comparable across
    checkpointing settings.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return 3.0 * 2.0 * vit_forward_macs_per_image(cfg) * batch_size
