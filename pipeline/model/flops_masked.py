"""Analytic FLOPs of MAE and SimMIM training steps: the numerator of their MFU.

Counted as ``flops.vit_flops`` counts classification (matmuls only, training = 3 x forward, the
recomputation of activation checkpointing left out), so the three objectives' figures compare.
"""
from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.model.mae import decoder_config


def _layer_macs(tokens: int, hidden: int, intermediate: int) -> int:
    """One ViTLayer on ``tokens`` tokens: Q/K/V, scores, context, output projection, MLP."""
    return (3 * tokens * hidden * hidden + 2 * tokens * tokens * hidden + tokens * hidden * hidden
            + 2 * tokens * hidden * intermediate)


def _patch_embed_macs(cfg: ModelConfig) -> int:
    patch_h, patch_w = cfg.patch_hw
    return cfg.num_patches * cfg.num_channels * patch_h * patch_w * cfg.hidden_size


def mae_kept_patches(cfg: ModelConfig) -> int:
    """Patches the MAE encoder sees: int(patches * (1 - mask_ratio)), HF's count."""
    return int(cfg.num_patches * (1 - cfg.mask_ratio))


def mae_forward_macs_per_image(cfg: ModelConfig) -> int:
    """One image through ViTMAEForPreTraining: the patch embedding of every patch (masking comes
    after it), the encoder on CLS + kept tokens, the decoder embedding of those, the decoder on
    CLS + every patch, and the pixel prediction of every token (HF drops the CLS row afterwards)."""
    dec = decoder_config(cfg)
    patch_h, patch_w = cfg.patch_hw
    encoder_tokens, decoder_tokens = 1 + mae_kept_patches(cfg), 1 + cfg.num_patches
    encoder = cfg.num_hidden_layers * _layer_macs(encoder_tokens, cfg.hidden_size, cfg.intermediate_size)
    decoder_embed = encoder_tokens * cfg.hidden_size * dec.hidden_size
    decoder = dec.num_hidden_layers * _layer_macs(decoder_tokens, dec.hidden_size, dec.intermediate_size)
    pred = decoder_tokens * dec.hidden_size * patch_h * patch_w * cfg.num_channels
    return _patch_embed_macs(cfg) + encoder + decoder_embed + decoder + pred


def simmim_forward_macs_per_image(cfg: ModelConfig) -> int:
    """One image through ViTForMaskedImageModeling: the encoder on every token (masked patches are
    replaced, not dropped), then the 1x1 conv to stride^2 * channels values per patch."""
    encoder = cfg.num_hidden_layers * _layer_macs(1 + cfg.num_patches, cfg.hidden_size, cfg.intermediate_size)
    decoder = cfg.num_patches * cfg.hidden_size * cfg.encoder_stride**2 * cfg.num_channels
    return _patch_embed_macs(cfg) + encoder + decoder


def _training_flops(macs_per_image: int, batch_size: int) -> float:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return 3.0 * 2.0 * macs_per_image * batch_size


def mae_flops(cfg: ModelConfig, batch_size: int) -> float:
    """Training FLOPs of one MAE step on ``batch_size`` images (forward = 2 x MACs, training = 3 x forward)."""
    return _training_flops(mae_forward_macs_per_image(cfg), batch_size)


def simmim_flops(cfg: ModelConfig, batch_size: int) -> float:
    """Training FLOPs of one SimMIM step on ``batch_size`` images."""
    return _training_flops(simmim_forward_macs_per_image(cfg), batch_size)
