"""Analytic FLOPs of a ViT training step, the numerator of MFU (model FLOPs utilisation)."""
from __future__ import annotations

from pipeline.config import ModelConfig


def layer_macs(tokens: int, hidden: int, intermediate: int) -> int:
    """One ViTLayer on ``tokens`` tokens: Q/K/V, scores (Q K^T) and context (P V) over every head,
    the attention output projection, the MLP up and down."""
    return (3 * tokens * hidden * hidden + 2 * tokens * tokens * hidden + tokens * hidden * hidden
            + 2 * tokens * hidden * intermediate)


def patch_embed_macs(cfg: ModelConfig) -> int:
    """The strided conv over every patch."""
    patch_h, patch_w = cfg.patch_hw
    return cfg.num_patches * cfg.num_channels * patch_h * patch_w * cfg.hidden_size


def training_flops(macs_per_image: int, batch_size: int) -> float:
    """forward = 2 * MACs, training = 3 * forward (the backward taken as twice the forward)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return 3.0 * 2.0 * macs_per_image * batch_size


def vit_forward_macs_per_image(cfg: ModelConfig) -> int:
    """Multiply-accumulates of one image's forward pass through ViTForImageClassification.

    Counts the matmuls only: patch embedding, Q/K/V and output projections, attention scores
    (Q K^T) and context (P V), the MLP, and the classifier on the CLS token. LayerNorm, softmax,
    activations and residual adds are elementwise and left out, as is customary for MFU.
    """
    tokens = cfg.num_patches + 1  # + CLS
    head = cfg.hidden_size * cfg.num_labels  # classifier on the CLS token only
    return (patch_embed_macs(cfg) + cfg.num_hidden_layers * layer_macs(tokens, cfg.hidden_size, cfg.intermediate_size)
            + head)


def vit_flops(cfg: ModelConfig, batch_size: int) -> float:
    """Training FLOPs of one step on ``batch_size`` images: forward = 2 * MACs, training = 3 * forward.

    The backward pass is taken as twice the forward (gradients for inputs and for weights); the
    recomputation of activation checkpointing is not counted, so MFU stays comparable across
    checkpointing settings.
    """
    return training_flops(vit_forward_macs_per_image(cfg), batch_size)
