"""The peers a user would switch to, built with our weights: transformers' ViTModel and timm's VisionTransformer,
and for pretraining transformers' ViTMAEForPreTraining (mae) and ViTForMaskedImageModeling (simmim).

Both are built from our ModelConfig with random weights (nothing is downloaded) and then given
*our* model's weights: HuggingFace's ViTModel takes our state dict unchanged (same names); timm's
VisionTransformer takes it through a key mapping (its Q, K and V are one fused ``qkv`` linear, so
ours are concatenated). ``max_abs_diff`` checks that all three compute the same function.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model import ViTModel
from pipeline.model.hf import MIM_EXTRA_FIELDS, config_to_hf

# The HF class of each masked-image objective: the same state dict names as ours.
HF_PRETRAINING = {"mae": "ViTMAEForPreTraining", "simmim": "ViTForMaskedImageModeling"}


def build_ours(cfg: ModelConfig) -> ViTModel:
    """Our backbone (no pooler, like the classification model uses it)."""
    return ViTModel(cfg, add_pooling_layer=False)


def build_hf(cfg: ModelConfig, ours: ViTModel, attn_implementation: str) -> nn.Module:
    """transformers' ViTModel with ``attn_implementation`` ("eager" or "sdpa") and our weights."""
    import transformers

    hf_config = transformers.ViTConfig(**{k: v for k, v in config_to_hf(cfg, architecture="ViTModel").items()
                                          if k not in ("architectures", "model_type")})
    hf_config._attn_implementation = attn_implementation
    model = transformers.ViTModel(hf_config, add_pooling_layer=False)
    model.load_state_dict(ours.state_dict(), strict=True)
    return model


def build_hf_pretraining(objective: str, cfg: ModelConfig, ours: nn.Module, attn_implementation: str) -> nn.Module:
    """transformers' model of ``objective`` ("mae" or "simmim") with our model's weights (same names)."""
    import transformers

    architecture = HF_PRETRAINING[objective]
    fields = {k: v for k, v in config_to_hf(cfg, architecture=architecture).items()
              if k not in ("architectures", "model_type", *MIM_EXTRA_FIELDS)}  # ours only: SimMIM's mask generator
    config_class = transformers.ViTMAEConfig if objective == "mae" else transformers.ViTConfig
    model = getattr(transformers, architecture)(config_class(**fields, attn_implementation=attn_implementation))
    model.load_state_dict(ours.state_dict(), strict=True)
    return model


def timm_state_dict(ours: ViTModel) -> dict[str, torch.Tensor]:
    """Our (HF-named) backbone weights under timm VisionTransformer's names."""
    src = ours.state_dict()
    out = {
        "cls_token": src["embeddings.cls_token"],
        "pos_embed": src["embeddings.position_embeddings"],
        "patch_embed.proj.weight": src["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": src["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": src["layernorm.weight"],
        "norm.bias": src["layernorm.bias"],
    }
    for i in range(len(ours.encoder.layer)):
        ours_prefix, timm_prefix = f"encoder.layer.{i}.", f"blocks.{i}."
        pairs = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
                 "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
        for ours_name, timm_name in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{timm_prefix}{timm_name}.{kind}"] = src[f"{ours_prefix}{ours_name}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = [src.get(f"{ours_prefix}attention.attention.{n}.{kind}") for n in ("query", "key", "value")]
            if all(t is not None for t in qkv):
                out[f"{timm_prefix}attn.qkv.{kind}"] = torch.cat(qkv, dim=0)  # (3 * hidden, hidden)
    return out


def build_timm(cfg: ModelConfig, ours: ViTModel) -> nn.Module:
    """timm's VisionTransformer of the same shape (CLS pooling, final norm, exact GELU, our LN eps),
    with our weights; ``forward_features`` gives the normalised tokens like our last_hidden_state."""
    from timm.models.vision_transformer import VisionTransformer

    if cfg.hidden_act != "gelu":
        raise ValueError(f"the timm peer is built with exact GELU; model.hidden_act is {cfg.hidden_act!r}")
    model = VisionTransformer(
        img_size=cfg.image_hw, patch_size=cfg.patch_hw, in_chans=cfg.num_channels, num_classes=0,
        global_pool="token", embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        qkv_bias=cfg.qkv_bias, weight_init="skip", act_layer=nn.GELU,
        norm_layer=functools.partial(nn.LayerNorm, eps=cfg.layer_norm_eps))
    model.load_state_dict(timm_state_dict(ours), strict=True)
    return model


def tokens_fn(name: str, model: nn.Module):
    """pixels -> (batch, tokens, hidden) final-normalised tokens, whatever the model's API."""
    if name == "timm":
        return model.forward_features
    return lambda pixels: model(pixels).last_hidden_state


@torch.no_grad()
def max_abs_diff(reference, other, pixels: torch.Tensor) -> float:
    """Largest elementwise difference of two models' tokens on the same input (fp32, eval mode)."""
    return float((reference(pixels) - other(pixels)).abs().max())
