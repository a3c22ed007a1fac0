"""The Vision Transformer (Dosovitskiy et al., 2020) in plain torch.

The module tree, parameter names and numerics follow HuggingFace transformers' ``modeling_vit``
(4.x), so a ``state_dict`` moves between the two unchanged. What differs is only what a training
pipeline needs: per-layer activation checkpointing, a fused SDPA path, and position-embedding
interpolation that also works for non-square grids and rectangular patches.

Shapes use: batch, tokens (= patches + 1 CLS), hidden, heads, head_dim.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig
from pipeline.model.activations import get_activation
from pipeline.model.outputs import ViTModelOutput


# --- embeddings -----------------------------------------------------------------------------

class PatchEmbeddings(nn.Module):
    """Pixels (batch, channels, height, width) -> patch tokens (batch, patches, hidden) by a strided conv."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.image_size = config.image_hw
        self.patch_size = config.patch_hw
        self.num_channels = config.num_channels
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size,
                                    kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(f"pixel_values have {channels} channels but the model expects "
                             f"{self.num_channels} (model.num_channels)")
        if not interpolate_pos_encoding and (height, width) != self.image_size:
            raise ValueError(f"input image size ({height}*{width}) doesn't match the model "
                             f"({self.image_size[0]}*{self.image_size[1]}); resize the input or pass "
                             "interpolate_pos_encoding=True")
        # (batch, hidden, grid_h, grid_w) -> (batch, patches, hidden), patches in row-major order
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    """CLS token + patch tokens (optionally some replaced by a mask token) + position embeddings."""

    def __init__(self, config: ModelConfig, use_mask_token: bool = False) -> None:
        super().__init__()
        # Values are placeholders; init_vit_weights sets the real (truncated normal / zero) init.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None
        self.patch_embeddings = PatchEmbeddings(config)
        num_positions = self.patch_embeddings.num_patches + 1
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, embeddings: Tensor, height: int, width: int) -> Tensor:
        """Position embeddings resized (bicubic) to the patch grid of a ``height`` x ``width`` image.

        The stored embeddings are read as the configured grid ``(image_h // patch_h, image_w // patch_w)``
        and resized to ``(height // patch_h, width // patch_w)``; the CLS position is kept as is. For a
        square stored grid and an integer patch size this is exactly HuggingFace's computation. HF has
        no answer for a non-square stored grid or a [h, w] patch size (it assumes sqrt(num_positions)
        and an int patch); here those cases use the actual grid and per-axis patch size.
        """
        grid_h, grid_w = self.patch_embeddings.grid_size
        patch_h, patch_w = self.patch_embeddings.patch_size
        new_h, new_w = height // patch_h, width // patch_w
        if (new_h, new_w) == (grid_h, grid_w):
            return self.position_embeddings
        hidden = embeddings.shape[-1]
        class_pos = self.position_embeddings[:, :1]  # (1, 1, hidden)
        # (1, patches, hidden) -> (1, hidden, grid_h, grid_w), the layout F.interpolate expects
        patch_pos = self.position_embeddings[:, 1:].reshape(1, grid_h, grid_w, hidden).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(new_h, new_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, new_h * new_w, hidden)
        return torch.cat((class_pos, patch_pos), dim=1)  # (1, 1 + new_h * new_w, hidden)

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None,
                interpolate_pos_encoding: bool = False) -> Tensor:
        batch, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values, interpolate_pos_encoding)  # (batch, patches, hidden)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a mask token; build ViTModel(config, use_mask_token=True)")
            # (batch, patches, 1): 1.0 where the patch is replaced by the mask token
            mask = bool_masked_pos.unsqueeze(-1).type_as(embeddings)
            embeddings = embeddings * (1.0 - mask) + self.mask_token.expand_as(embeddings) * mask
        cls_tokens = self.cls_token.expand(batch, -1, -1)  # (batch, 1, hidden)
        embeddings = torch.cat((cls_tokens, embeddings), dim=1)  # (batch, tokens, hidden)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings)


# --- transformer layer ----------------------------------------------------------------------

class ViTSelfAttention(nn.Module):
    """Multi-head self-attention: returns the per-head context (not yet projected) and, if asked, the maps."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size  # shrinks when heads are pruned
        self.scaling = self.attention_head_size ** -0.5
        self.query = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden_states: Tensor, head_mask: Tensor | None = None,
                output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        batch, tokens, _ = hidden_states.shape
        heads_shape = (batch, tokens, self.num_attention_heads, self.attention_head_size)
        # (batch, tokens, hidden) -> (batch, heads, tokens, head_dim)
        query = self.query(hidden_states).view(heads_shape).transpose(1, 2)
        key = self.key(hidden_states).view(heads_shape).transpose(1, 2)
        value = self.value(hidden_states).view(heads_shape).transpose(1, 2)

        if head_mask is None and not output_attentions and _sdpa_is_faster(query):
            # Fused kernel (flash / memory-efficient where available): never materialises the maps.
            dropout_p = self.dropout.p if self.training else 0.0
            context = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=self.scaling)
            probs = None
        else:
            # Explicit path, needed to return the maps or to scale them per head. Scaling the
            # queries (tokens x head_dim) costs less than scaling the scores (tokens x tokens).
            scores = torch.matmul(query * self.scaling, key.transpose(-1, -2))  # (batch, heads, tokens, tokens)
            # Softmax in fp32 arithmetic, as HF does; for bf16 torch's kernel computes in fp32 inside
            # and rounds once, without fp32 maps (docs/DECISIONS.md, Attention).
            if scores.dtype == torch.bfloat16:
                probs = F.softmax(scores, dim=-1)
            else:
                probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            probs = self.dropout(probs)
            if head_mask is not None:
                probs = probs * head_mask  # head_mask broadcasts as (1 or batch, heads, 1, 1)
            context = torch.matmul(probs, value)  # (batch, heads, tokens, head_dim)
        # (batch, heads, tokens, head_dim) -> (batch, tokens, heads * head_dim)
        context = context.transpose(1, 2).reshape(batch, tokens, self.all_head_size)
        return context, probs


def _sdpa_is_faster(query: Tensor) -> bool:
    """SDPA everywhere except bf16/fp16 on CPU, where torch's CPU flash kernel is slower than the
    explicit path (docs/DECISIONS.md, Attention). Same numbers either way, within rounding."""
    return query.device.type != "cpu" or query.dtype == torch.float32


class ViTSelfOutput(nn.Module):
    """Output projection of attention. The residual is added in ViTLayer (pre-LN layout)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.dropout(self.dense(hidden_states))


def _prune_linear(layer: nn.Linear, keep: Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping only the output (dim=0) or input (dim=1) features at indices ``keep``."""
    weight = layer.weight.detach().index_select(dim, keep).clone()
    bias = None
    if layer.bias is not None:
        bias = layer.bias.detach().clone() if dim == 1 else layer.bias.detach()[keep].clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new


class ViTAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = ViTSelfAttention(config)
        self.output = ViTSelfOutput(config)
        self.pruned_heads: set[int] = set()

    def prune_heads(self, heads: Iterable[int]) -> None:
        """Remove attention heads, numbered as in the unpruned layer (so repeated calls compose, as in HF)."""
        heads = set(heads) - self.pruned_heads
        if not heads:
            return
        attn = self.attention
        keep_mask = torch.ones(attn.num_attention_heads, attn.attention_head_size, dtype=torch.bool)
        for head in heads:
            # position of this head among those still present
            keep_mask[head - sum(1 for pruned in self.pruned_heads if pruned < head)] = False
        keep = keep_mask.flatten().nonzero().squeeze(1).to(attn.query.weight.device)
        attn.query = _prune_linear(attn.query, keep, dim=0)
        attn.key = _prune_linear(attn.key, keep, dim=0)
        attn.value = _prune_linear(attn.value, keep, dim=0)
        self.output.dense = _prune_linear(self.output.dense, keep, dim=1)
        attn.num_attention_heads -= len(heads)
        attn.all_head_size = attn.num_attention_heads * attn.attention_head_size
        self.pruned_heads |= heads

    def forward(self, hidden_states: Tensor, head_mask: Tensor | None = None,
                output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        context, probs = self.attention(hidden_states, head_mask, output_attentions)
        return self.output(context), probs


class ViTIntermediate(nn.Module):
    """First MLP projection and the activation."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = get_activation(config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))  # (batch, tokens, intermediate)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016) per sample, as timm's ``DropPath`` and
    ``torchvision.ops.stochastic_depth(mode="row")``: in training, each sample's residual branch
    is zeroed with probability ``p`` and the kept ones scaled by 1 / (1 - p), so the expectation
    is the branch itself. No parameters: the state dict stays HF's."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, branch: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return branch  # the very tensor: at rate 0 a run is bitwise what it was without
        keep = 1.0 - self.p
        # (batch, 1, 1): one draw per sample, in the branch's dtype, from torch's global generator
        # (what activation checkpointing's recompute restores, and what checkpoints save).
        noise = torch.empty((branch.shape[0],) + (1,) * (branch.ndim - 1), dtype=branch.dtype, device=branch.device)
        noise.bernoulli_(keep).div_(keep)
        return branch * noise

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ViTOutput(nn.Module):
    """Second MLP projection, plus the block's second residual."""

    def __init__(self, config: ModelConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.drop_path(self.dropout(self.dense(hidden_states))) + input_tensor


class ViTLayer(nn.Module):
    """One pre-LN transformer block: x + Attn(LN(x)), then h + MLP(LN(h)); with ``drop_path`` > 0
    each branch is dropped per sample in training (stochastic depth, DropPath)."""

    def __init__(self, config: ModelConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.attention = ViTAttention(config)
        self.intermediate = ViTIntermediate(config)
        self.output = ViTOutput(config, drop_path)
        self.drop_path = DropPath(drop_path)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor, head_mask: Tensor | None = None,
                output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        attention_output, probs = self.attention(self.layernorm_before(hidden_states), head_mask, output_attentions)
        hidden_states = self.drop_path(attention_output) + hidden_states  # first residual
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        return layer_output, probs


def drop_path_rates(rate: float, num_layers: int) -> list[float]:
    """Stochastic depth rising linearly from 0 (first layer) to ``rate`` (last), as timm and DeiT
    space it (``torch.linspace``, so the rates are timm's to the bit). On the CPU whatever the default
    device: a model built on the meta device (to count its parameters) needs the numbers too."""
    return [float(r) for r in torch.linspace(0, rate, num_layers, device="cpu")]


class ViTEncoder(nn.Module):
    """The stack of ViTLayers, each optionally recomputed in backward (activation checkpointing)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        rates = drop_path_rates(config.drop_path_rate, config.num_hidden_layers)
        self.layer = nn.ModuleList([ViTLayer(config, rate) for rate in rates])
        self.checkpoint_layer_ids: set[int] = config.checkpoint_layer_ids()

    def forward(self, hidden_states: Tensor, head_mask: list[Tensor | None] | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False) -> ViTModelOutput:
        all_hidden = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        # Recomputation only pays off when a backward pass will follow.
        recompute = self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layer):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            layer_mask = head_mask[i] if head_mask is not None else None
            if recompute and i in self.checkpoint_layer_ids:
                # Non-reentrant checkpointing also restores the RNG, so dropout masks match on recompute.
                hidden_states, probs = checkpoint(layer, hidden_states, layer_mask, output_attentions,
                                                  use_reentrant=False)
            else:
                hidden_states, probs = layer(hidden_states, layer_mask, output_attentions)
            if all_attentions is not None:
                all_attentions.append(probs)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return ViTModelOutput(last_hidden_state=hidden_states,
                              hidden_states=tuple(all_hidden) if all_hidden is not None else None,
                              attentions=tuple(all_attentions) if all_attentions is not None else None)


class ViTPooler(nn.Module):
    """Dense + activation on the CLS token (HF's pooler; only ViTModel(add_pooling_layer=True) has one)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size or config.hidden_size)
        self.activation = get_activation(config.pooler_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))  # (batch, pooler_output_size)


# --- init -----------------------------------------------------------------------------------

@torch.no_grad()
def init_vit_weights(module: nn.Module, std: float) -> None:
    """HF ViT's ``_init_weights``: truncated normal(0, std) cut at +-2 (absolute, as HF), zero biases,
    LayerNorm ones/zeros, CLS and position embeddings truncated normal, mask token zero.
    Sampling happens in fp32 so the distribution does not depend on the parameter dtype."""

    def trunc_normal(param: Tensor) -> None:
        param.copy_(nn.init.trunc_normal_(torch.empty_like(param, dtype=torch.float32), mean=0.0, std=std))

    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            trunc_normal(sub.weight)
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, nn.LayerNorm):
            sub.weight.fill_(1.0)
            sub.bias.zero_()
        elif isinstance(sub, ViTEmbeddings):
            trunc_normal(sub.position_embeddings)
            trunc_normal(sub.cls_token)
            if sub.mask_token is not None:
                sub.mask_token.zero_()


# --- the model ------------------------------------------------------------------------------

def expand_head_mask(head_mask: Tensor | None, num_layers: int, dtype: torch.dtype) -> list[Tensor | None]:
    """(heads,) or (layers, heads) -> one (1, heads, 1, 1) multiplier per layer (1 keeps, 0 drops a head)."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.dim() == 1:
        head_mask = head_mask.unsqueeze(0).expand(num_layers, -1)
    if head_mask.dim() != 2 or head_mask.shape[0] != num_layers:
        raise ValueError(f"head_mask must have shape (heads,) or ({num_layers}, heads), got {tuple(head_mask.shape)}")
    return [m.to(dtype).view(1, -1, 1, 1) for m in head_mask]


class ViTModel(nn.Module):
    """Embeddings -> encoder -> final LayerNorm (-> optional pooler). HF's ``ViTModel``."""

    def __init__(self, config: ModelConfig, add_pooling_layer: bool = True, use_mask_token: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config, use_mask_token=use_mask_token)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        init_vit_weights(self, config.initializer_range)

    def set_activation_checkpointing(self, spec: str) -> None:
        """Change checkpointing after construction: "none", "all" or "every-K" (validated as in the config)."""
        self.config = dataclasses.replace(self.config, activation_checkpointing=spec)
        self.encoder.checkpoint_layer_ids = self.config.checkpoint_layer_ids()

    def prune_heads(self, heads_to_prune: dict[int, Iterable[int]]) -> None:
        """``{layer: [heads]}``, heads numbered as in the unpruned model."""
        for layer, heads in heads_to_prune.items():
            self.encoder.layer[layer].attention.prune_heads(heads)

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None, head_mask: Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False) -> ViTModelOutput:
        # Inputs follow the weights' dtype (e.g. fp32 images into a bf16 model), as HF does.
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        pixel_values = pixel_values.to(dtype)
        layer_masks = expand_head_mask(head_mask, len(self.encoder.layer), dtype)
        embeddings = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        encoded = self.encoder(embeddings, layer_masks, output_attentions, output_hidden_states)
        sequence_output = self.layernorm(encoded.last_hidden_state)  # (batch, tokens, hidden)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        return ViTModelOutput(last_hidden_state=sequence_output, pooler_output=pooled,
                              hidden_states=encoded.hidden_states, attentions=encoded.attentions)
