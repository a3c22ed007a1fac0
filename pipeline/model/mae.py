"""Masked autoencoder (He et al., 2021) on the ViT of ``vit.py``: HF's ``ViTMAEForPreTraining``.

Parameter and buffer names, the random masking driven by a ``noise`` tensor, the decoder and the
loss follow transformers' ``modeling_vit_mae`` (4.57), so a ``state_dict`` moves between the two
unchanged and, given the same weights and noise, loss and logits agree in fp32. The encoder runs
on the kept tokens only (where MAE's speed comes from), through ``ViTLayer``'s SDPA path, with the
same per-layer activation checkpointing as classification.

Where HF assumes a square patch grid (the sin-cos tables, ``patchify``) this code uses the actual
``(grid_h, grid_w)`` and ``(patch_h, patch_w)``; for square grids the numbers are HF's.

Shapes use: batch, patches (N), kept (patches left after masking), tokens (= kept or N, + 1 CLS).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig
from pipeline.model.outputs import ModelOutput
from pipeline.model.vit import PatchEmbeddings, ViTEmbeddings, ViTEncoder, ViTLayer, expand_head_mask


class ViTMAEModelOutput(ModelOutput):
    """last_hidden_state (batch, 1 + kept, hidden) after the final LayerNorm; mask (batch, patches),
    1.0 where a patch was removed; ids_restore (batch, patches): the inverse of the shuffle."""

    def __init__(self, last_hidden_state: Tensor, mask: Tensor | None, ids_restore: Tensor | None,
                 hidden_states: tuple[Tensor, ...] | None = None, attentions: tuple[Tensor, ...] | None = None):
        super().__init__(last_hidden_state=last_hidden_state, mask=mask, ids_restore=ids_restore,
                         hidden_states=hidden_states, attentions=attentions)


class ViTMAEForPreTrainingOutput(ModelOutput):
    """loss (scalar, fp32); logits (batch, patches, patch_h * patch_w * channels): the predicted pixels
    of every patch; mask and ids_restore as in :class:`ViTMAEModelOutput`."""

    def __init__(self, loss: Tensor, logits: Tensor, mask: Tensor, ids_restore: Tensor,
                 hidden_states: tuple[Tensor, ...] | None = None, attentions: tuple[Tensor, ...] | None = None):
        super().__init__(loss=loss, logits=logits, mask=mask, ids_restore=ids_restore,
                         hidden_states=hidden_states, attentions=attentions)


# --- fixed position tables and patch layout -------------------------------------------------

def _sincos_1d(width: int, positions: Tensor) -> Tensor:
    """(M,) float64 positions -> (M, width): sin of position * frequency, then cos, as MAE's recipe."""
    omega = torch.arange(width // 2, dtype=torch.float64) / (width / 2.0)
    omega = 1.0 / 10000**omega  # (width / 2,) frequencies
    angles = positions.reshape(-1, 1) * omega  # (M, width / 2), outer product
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def sincos_2d(width: int, grid_size: tuple[int, int], add_cls_token: bool = False) -> Tensor:
    """MAE's fixed 2-D sin-cos table, (grid_h * grid_w [+ 1], width) fp32, patches in row-major order.

    The first half of the channels encodes the column, the second half the row (HF's meshgrid puts
    w first). HF builds a square grid from sqrt(patches); a rectangular grid here uses its own rows
    and columns, which is the same table when the grid is square. Computed in float64, as HF does.
    """
    if width % 4 != 0:
        raise ValueError(f"MAE's sin-cos position table needs a width divisible by 4, got {width}; "
                         "choose model.hidden_size and model.decoder_hidden_size as multiples of 4")
    grid_h, grid_w = grid_size
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")  # (grid_h, grid_w)
    table = torch.cat((_sincos_1d(width // 2, cols), _sincos_1d(width // 2, rows)), dim=1)
    if add_cls_token:
        table = torch.cat((torch.zeros(1, width, dtype=table.dtype), table), dim=0)  # the CLS gets zeros
    return table.float()


def patchify(pixel_values: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(batch, channels, height, width) -> (batch, patches, patch_h * patch_w * channels).

    Patches in row-major order (as the patch embedding's), each flattened as (patch_h, patch_w,
    channels): HF's "nchpwq->nhwpqc" order, for any grid shape.
    """
    batch, channels, height, width = pixel_values.shape
    patch_h, patch_w = patch_size
    if height % patch_h or width % patch_w:
        raise ValueError(f"pixel size {height}x{width} is not divisible by the patch size {patch_h}x{patch_w}")
    grid_h, grid_w = height // patch_h, width // patch_w
    x = pixel_values.reshape(batch, channels, grid_h, patch_h, grid_w, patch_w)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (batch, grid_h, grid_w, patch_h, patch_w, channels)
    return x.reshape(batch, grid_h * grid_w, patch_h * patch_w * channels)


def unpatchify(patches: Tensor, patch_size: tuple[int, int], image_size: tuple[int, int],
               num_channels: int) -> Tensor:
    """The inverse of :func:`patchify`: (batch, patches, patch_h * patch_w * channels) -> images."""
    (patch_h, patch_w), (height, width) = patch_size, image_size
    grid_h, grid_w = height // patch_h, width // patch_w
    if patches.shape[1] != grid_h * grid_w:
        raise ValueError(f"{patches.shape[1]} patches do not tile a {height}x{width} image "
                         f"({grid_h}x{grid_w} patches of {patch_h}x{patch_w})")
    x = patches.reshape(patches.shape[0], grid_h, grid_w, patch_h, patch_w, num_channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (batch, channels, grid_h, patch_h, grid_w, patch_w)
    return x.reshape(patches.shape[0], num_channels, height, width)


# --- encoder --------------------------------------------------------------------------------

class ViTMAEEmbeddings(nn.Module):
    """Patch tokens + fixed sin-cos positions, random masking, then the CLS token in front."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.mask_ratio = config.mask_ratio
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = PatchEmbeddings(config)
        # Fixed, never trained: a buffer (HF has a requires_grad=False parameter of the same name), so
        # no optimizer, weight decay or ZeRO partition ever sees it; it is still in the state dict.
        table = sincos_2d(config.hidden_size, self.patch_embeddings.grid_size, add_cls_token=True)
        self.register_buffer("position_embeddings", table.unsqueeze(0))  # (1, 1 + patches, hidden)

    # The same bicubic resize as the classifier's embeddings (identical to HF's for a square stored
    # grid, the actual grid otherwise); it reads only patch_embeddings and position_embeddings.
    interpolate_pos_encoding = ViTEmbeddings.interpolate_pos_encoding

    def random_masking(self, sequence: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Keep the ``int(patches * (1 - mask_ratio))`` patches with the smallest noise, as HF does.

        sequence (batch, patches, hidden) -> kept (batch, kept, hidden), mask (batch, patches) with 1.0
        on removed patches (fp32), ids_restore (batch, patches): where each patch sits in the shuffle.
        """
        batch, patches, hidden = sequence.shape
        len_keep = int(patches * (1 - self.mask_ratio))  # HF's expression, so float rounding agrees
        if noise is None:
            noise = torch.rand(batch, patches, device=sequence.device)
        if noise.shape != (batch, patches):
            raise ValueError(f"noise must have shape (batch, patches) = {(batch, patches)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(sequence.device), dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        kept = torch.gather(sequence, 1, ids_keep.unsqueeze(-1).expand(-1, -1, hidden))  # (batch, kept, hidden)
        # A patch is removed iff its rank in the shuffle is >= len_keep (HF builds the same 0/1 mask
        # by writing ones after len_keep and un-shuffling them).
        mask = (ids_restore >= len_keep).to(torch.float32)
        return kept, mask, ids_restore

    def forward(self, pixel_values: Tensor, noise: Tensor | None = None, interpolate_pos_encoding: bool = False,
                masking: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        _, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values, interpolate_pos_encoding)  # (batch, patches, hidden)
        positions = self.position_embeddings
        if interpolate_pos_encoding:
            positions = self.interpolate_pos_encoding(embeddings, height, width)
        # The table is a buffer, which DeepSpeed leaves in fp32 when it casts the weights to bf16/fp16:
        # it follows the weights' dtype here (HF's is a frozen parameter, cast with the weights).
        positions = positions.to(embeddings.dtype)
        embeddings = embeddings + positions[:, 1:]
        mask = ids_restore = None
        if masking:
            embeddings, mask, ids_restore = self.random_masking(embeddings, noise)
        cls_tokens = (self.cls_token + positions[:, :1]).expand(embeddings.shape[0], -1, -1)  # (batch, 1, hidden)
        return torch.cat((cls_tokens, embeddings), dim=1), mask, ids_restore


class ViTMAEModel(nn.Module):
    """Embeddings (with masking) -> ViTEncoder on the kept tokens -> final LayerNorm. HF's ``ViTMAEModel``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ViTMAEEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: Tensor, noise: Tensor | None = None, head_mask: Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False, masking: bool = True) -> ViTMAEModelOutput:
        """``masking=False`` (not in HF) encodes every patch in its own order: the features a probe or
        an encoder-only export sees. HF's mask_ratio=0 would still shuffle the tokens."""
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        layer_masks = expand_head_mask(head_mask, len(self.encoder.layer), dtype)
        embeddings, mask, ids_restore = self.embeddings(pixel_values.to(dtype), noise, interpolate_pos_encoding,
                                                        masking)
        encoded = self.encoder(embeddings, layer_masks, output_attentions, output_hidden_states)
        return ViTMAEModelOutput(last_hidden_state=self.layernorm(encoded.last_hidden_state), mask=mask,
                                 ids_restore=ids_restore, hidden_states=encoded.hidden_states,
                                 attentions=encoded.attentions)


# --- decoder --------------------------------------------------------------------------------

def decoder_config(config: ModelConfig) -> ModelConfig:
    """The encoder's config with the decoder's width, depth, heads and MLP size (as HF builds it).
    MAE's decoder has no stochastic depth: model.drop_path_rate is the encoder's."""
    return dataclasses.replace(config, drop_path_rate=0.0, hidden_size=config.decoder_hidden_size,
                               num_hidden_layers=config.decoder_num_hidden_layers,
                               num_attention_heads=config.decoder_num_attention_heads,
                               intermediate_size=config.decoder_intermediate_size)


class ViTMAEDecoder(nn.Module):
    """Encoded kept tokens + mask tokens, un-shuffled, + fixed positions -> ViTLayers -> pixels per patch."""

    def __init__(self, config: ModelConfig, grid_size: tuple[int, int]) -> None:
        super().__init__()
        dec = decoder_config(config)
        self.config = dec
        (patch_h, patch_w), width = config.patch_hw, dec.hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("decoder_pos_embed", sincos_2d(width, grid_size, add_cls_token=True).unsqueeze(0))
        self.decoder_layers = nn.ModuleList([ViTLayer(dec) for _ in range(dec.num_hidden_layers)])
        self.decoder_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(width, patch_h * patch_w * config.num_channels)
        self.checkpoint_layer_ids: set[int] = dec.checkpoint_layer_ids()

    def interpolate_pos_encoding(self, tokens: int) -> Tensor:
        """HF's decoder resize: a 1-D bicubic stretch of the flattened patch table to ``tokens - 1``
        positions (not a 2-D resize; kept as HF has it so the numbers agree). Identity at equal length."""
        cls_pos, patch_pos = self.decoder_pos_embed[:, :1], self.decoder_pos_embed[:, 1:]
        width = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, 1, -1, width).permute(0, 3, 1, 2)  # (1, width, 1, patches)
        patch_pos = nn.functional.interpolate(patch_pos, size=(1, tokens - 1), mode="bicubic", align_corners=False)
        return torch.cat((cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, width)), dim=1)

    def forward(self, hidden_states: Tensor, ids_restore: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        x = self.decoder_embed(hidden_states)  # (batch, 1 + kept, width)
        batch, kept_tokens, width = x.shape
        patches = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(batch, patches + 1 - kept_tokens, -1)  # (batch, removed, width)
        shuffled = torch.cat((x[:, 1:], mask_tokens), dim=1)  # (batch, patches, width), in shuffle order
        unshuffled = torch.gather(shuffled, 1, ids_restore.to(x.device).unsqueeze(-1).expand(-1, -1, width))
        x = torch.cat((x[:, :1], unshuffled), dim=1)  # (batch, 1 + patches, width), image order
        positions = self.interpolate_pos_encoding(x.shape[1]) if interpolate_pos_encoding else self.decoder_pos_embed
        x = x + positions.to(x.dtype)  # a buffer: fp32 under DeepSpeed's bf16 (see ViTMAEEmbeddings)
        recompute = self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.decoder_layers):
            if recompute and i in self.checkpoint_layer_ids:
                x, _ = checkpoint(layer, x, None, False, use_reentrant=False)
            else:
                x, _ = layer(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (batch, patches, patch_h * patch_w * channels)


# --- the model ------------------------------------------------------------------------------

@torch.no_grad()
def init_mae_weights(model: nn.Module, std: float) -> None:
    """HF ViTMAE's initialisation: normal(0, std) matmul weights, zero biases, LayerNorm ones/zeros,
    xavier-uniform patch projection (as a Linear), normal(0, std) CLS and mask tokens. The sin-cos
    tables are built in the constructors. (HF 4.57's ``_init_weights`` also zeroes the decoder's mask
    token and position table after building them; a zero position table leaves the decoder blind to
    where a patch is, so the MAE paper's init is kept here.) Sampling in fp32, as init_vit_weights."""

    def fill(param: Tensor, init) -> None:
        sample = torch.empty_like(param, dtype=torch.float32)
        init(sample.view(sample.shape[0], -1) if sample.dim() > 1 else sample)
        param.copy_(sample)

    for sub in model.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            fill(sub.weight, lambda t: nn.init.normal_(t, std=std))
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, nn.LayerNorm):
            sub.weight.fill_(1.0)
            sub.bias.zero_()
    embeddings = model.vit.embeddings
    fill(embeddings.patch_embeddings.projection.weight, nn.init.xavier_uniform_)
    fill(embeddings.cls_token, lambda t: nn.init.normal_(t, std=std))
    fill(model.decoder.mask_token, lambda t: nn.init.normal_(t, std=std))


class ViTMAEForPreTraining(nn.Module):
    """ViTMAEModel + ViTMAEDecoder and the masked-patch MSE loss. Names match HF (``vit.*``, ``decoder.*``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViTMAEModel(config)
        self.decoder = ViTMAEDecoder(config, self.vit.embeddings.patch_embeddings.grid_size)
        init_mae_weights(self, config.initializer_range)

    def set_activation_checkpointing(self, spec: str) -> None:
        """"none", "all" or "every-K", applied to the encoder's and the decoder's layers alike."""
        self.config = dataclasses.replace(self.config, activation_checkpointing=spec)
        self.vit.encoder.checkpoint_layer_ids = self.config.checkpoint_layer_ids()
        self.decoder.checkpoint_layer_ids = decoder_config(self.config).checkpoint_layer_ids()

    def prune_heads(self, heads_to_prune: dict[int, Iterable[int]]) -> None:
        """``{layer: [heads]}`` of the encoder, heads numbered as in the unpruned model."""
        for layer, heads in heads_to_prune.items():
            self.vit.encoder.layer[layer].attention.prune_heads(heads)

    def patchify(self, pixel_values: Tensor) -> Tensor:
        """(batch, channels, height, width) -> (batch, patches, patch_h * patch_w * channels), HF's order."""
        return patchify(pixel_values, self.config.patch_hw)

    def unpatchify(self, patches: Tensor, image_size: tuple[int, int] | None = None) -> Tensor:
        """Predicted patches (e.g. ``logits``) back to (batch, channels, height, width) images."""
        return unpatchify(patches, self.config.patch_hw, image_size or self.config.image_hw, self.config.num_channels)

    def forward_loss(self, pixel_values: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over the removed patches only; in fp32."""
        target = self.patchify(pixel_values.float())  # (batch, patches, patch_h * patch_w * channels)
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)  # unbiased, as HF
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (batch, patches)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, pixel_values: Tensor, noise: Tensor | None = None, head_mask: Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False) -> ViTMAEForPreTrainingOutput:
        """``noise`` (batch, patches): the patches with the smallest values are kept; drawn from torch's
        global generator when absent (pass one from ``pipeline.model.masking.mae_noise`` to control it)."""
        outputs = self.vit(pixel_values, noise=noise, head_mask=head_mask, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, interpolate_pos_encoding=interpolate_pos_encoding)
        logits = self.decoder(outputs.last_hidden_state, outputs.ids_restore, interpolate_pos_encoding)
        loss = self.forward_loss(pixel_values, logits, outputs.mask)
        return ViTMAEForPreTrainingOutput(loss=loss, logits=logits, mask=outputs.mask,
                                          ids_restore=outputs.ids_restore, hidden_states=outputs.hidden_states,
                                          attentions=outputs.attentions)

    def encoder_features(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(CLS token, mean of the patch tokens), each (batch, hidden), of the final-LayerNormed encoder
        output on all patches, unmasked and in image order: what a k-NN or linear probe reads."""
        tokens = self.vit(pixel_values, masking=False).last_hidden_state  # (batch, 1 + patches, hidden)
        return tokens[:, 0], tokens[:, 1:].mean(dim=1)
