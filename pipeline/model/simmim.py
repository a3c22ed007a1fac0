"""SimMIM (Xie et al., 2021) on the ViT of ``vit.py``: HF's ``ViTForMaskedImageModeling``.

The masked patches are replaced by a learned mask token (``ViTModel(use_mask_token=True)``), every
patch is encoded, and a 1x1 conv + PixelShuffle(``encoder_stride``) turns the patch tokens back
into pixels; the loss is the L1 error on the masked pixels. Names and numbers follow transformers'
``modeling_vit`` (4.57). Where HF assumes a square patch grid (it takes sqrt(tokens) as both sides)
this code uses the actual ``(grid_h, grid_w)``, which is HF's computation when the grid is square.

Shapes use: batch, patches (= grid_h * grid_w), hidden, channels, height, width.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.model.outputs import ModelOutput
from pipeline.model.vit import ViTModel, init_vit_weights


class MaskedImageModelingOutput(ModelOutput):
    """HF's fields: loss (scalar, fp32; only with ``bool_masked_pos``) and reconstruction (batch,
    channels, grid_h * stride, grid_w * stride). ``logits`` is the reconstruction under the name the
    training loop reads for every objective; it is not a second dict entry."""

    def __init__(self, loss: Tensor | None, reconstruction: Tensor, hidden_states: tuple[Tensor, ...] | None = None,
                 attentions: tuple[Tensor, ...] | None = None):
        super().__init__(loss=loss, reconstruction=reconstruction, hidden_states=hidden_states, attentions=attentions)

    @property
    def logits(self) -> Tensor:
        return self["reconstruction"]


class ViTForMaskedImageModeling(nn.Module):
    """ViTModel with a mask token and no pooler, and the pixel decoder. Names match HF (``vit.*``,
    ``decoder.0.*``; ``decoder.1`` is the parameter-free PixelShuffle)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        patch_h, patch_w = config.patch_hw
        if patch_h != patch_w:
            # PixelShuffle upsamples both axes by one factor, so a [h, w] patch cannot be rebuilt.
            raise ValueError(f"SimMIM needs a square patch (PixelShuffle has one factor), got model.patch_size "
                             f"{config.patch_size}; use an integer patch_size")
        self.config = config
        self.vit = ViTModel(config, add_pooling_layer=False, use_mask_token=True)  # initialises its own weights
        stride = config.encoder_stride
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, stride**2 * config.num_channels, kernel_size=1),
            nn.PixelShuffle(stride),
        )
        init_vit_weights(self.decoder, config.initializer_range)

    def set_activation_checkpointing(self, spec: str) -> None:
        """"none", "all" or "every-K"; see ModelConfig.activation_checkpointing."""
        self.vit.set_activation_checkpointing(spec)
        self.config = dataclasses.replace(self.config, activation_checkpointing=spec)

    def prune_heads(self, heads_to_prune: dict[int, Iterable[int]]) -> None:
        self.vit.prune_heads(heads_to_prune)

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None, head_mask: Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False) -> MaskedImageModelingOutput:
        """``bool_masked_pos`` (batch, patches), True where a patch is replaced by the mask token (see
        ``pipeline.model.masking.simmim_mask``). Without it there is no masking and no loss."""
        patch = self.config.patch_hw[0]
        if bool_masked_pos is not None and patch != self.config.encoder_stride:
            raise ValueError(f"with bool_masked_pos the reconstruction must have the input's size: model.patch_size "
                             f"({patch}) must equal model.encoder_stride ({self.config.encoder_stride})")
        outputs = self.vit(pixel_values, bool_masked_pos=bool_masked_pos, head_mask=head_mask,
                           output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                           interpolate_pos_encoding=interpolate_pos_encoding)
        grid_h, grid_w = pixel_values.shape[2] // patch, pixel_values.shape[3] // patch
        tokens = outputs.last_hidden_state[:, 1:]  # (batch, patches, hidden), row-major; CLS dropped
        batch, _, hidden = tokens.shape
        feature_map = tokens.permute(0, 2, 1).reshape(batch, hidden, grid_h, grid_w)
        reconstruction = self.decoder(feature_map)  # (batch, channels, grid_h * stride, grid_w * stride)

        loss = None
        if bool_masked_pos is not None:
            # (batch, patches) -> (batch, 1, height, width): each patch's flag over its pixels
            mask = (bool_masked_pos.reshape(-1, grid_h, grid_w).repeat_interleave(patch, 1)
                    .repeat_interleave(patch, 2).unsqueeze(1))
            # HF's formula (sum over masked pixels and channels / masked pixels / channels), in fp32
            l1 = nn.functional.l1_loss(pixel_values.float(), reconstruction.float(), reduction="none")
            loss = (l1 * mask).sum() / (mask.sum() + 1e-5) / self.config.num_channels
        return MaskedImageModelingOutput(loss=loss, reconstruction=reconstruction,
                                         hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def encoder_features(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(CLS token, mean of the patch tokens), each (batch, hidden), of the unmasked encoder output."""
        tokens = self.vit(pixel_values).last_hidden_state  # (batch, 1 + patches, hidden)
        return tokens[:, 0], tokens[:, 1:].mean(dim=1)
