"""Analytic FLOPs of MAE and SimMIM training steps: the numerator of their MFU.

Counted as ``flops.vit_flops`` counts classification (matmuls only, training = 3 x forward, the
recomputation of activation checkpointing left out), so the three objectives' figures compare.
"""
from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.model.flops import layer_macs, patch_embed_macs, training_flops
from pipeline.model.mae import decoder_config


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
    encoder = cfg.num_hidden_layers * layer_macs(encoder_tokens, cfg.hidden_size, cfg.intermediate_size)
    decoder_embed = encoder_tokens * cfg.hidden_size * dec.hidden_size
    decoder = dec.num_hidden_layers * layer_macs(decoder_tokens, dec.hidden_size, dec.intermediate_size)
    pred = decoder_tokens * dec.hidden_size * patch_h * patch_w * cfg.num_channels
    return patch_embed_macs(cfg) + encoder + decoder_embed + decoder + pred


def simmim_forward_macs_per_image(cfg: ModelConfig) -> int:
    """One image through ViTForMaskedImageModeling: the encoder on every token (masked patches are
    replaced, not dropped), then the 1x1 conv to stride^2 * channels values per patch."""
    encoder = cfg.num_hidden_layers * layer_macs(1 + cfg.num_patches, cfg.hidden_size, cfg.intermediate_size)
    decoder = cfg.num_patches * cfg.hidden_size * cfg.encoder_stride**2 * cfg.num_channels
    return patch_embed_macs(cfg) + encoder + decoder


def mae_flops(cfg: ModelConfig, batch_size: int) -> float:
    """Training FLOPs of one MAE step on ``batch_size`` images (forward = 2 x MACs, training = 3 x forward)."""
    return training_flops(mae_forward_macs_per_image(cfg), batch_size)


def simmim_flops(cfg: ModelConfig, batch_size: int) -> float:
    """Training FLOPs of one SimMIM step on ``batch_size`` images."""
    return training_flops(simmim_forward_macs_per_image(cfg), batch_size)
