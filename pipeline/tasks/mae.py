"""MAE pretraining (He et al., 2021): HF's ViTMAEForPreTraining, masking 75% of the patches by noise."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.model import ViTMAEForPreTraining, mae_flops, mae_noise
from pipeline.tasks.base import ENCODER_SHAPE_FIELDS
from pipeline.tasks.masked import MaskedImageTask, sums

DECODER_SHAPE_FIELDS = ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
                        "decoder_intermediate_size")


class MAETask(MaskedImageTask):
    name = "mae"
    shape_fields = (*ENCODER_SHAPE_FIELDS, *DECODER_SHAPE_FIELDS)

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        return ViTMAEForPreTraining(model_cfg)

    def noise(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return mae_noise(images.shape[0], self.model_cfg.num_patches, generator=generator)  # (batch, patches)

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        images = batch["image"]
        return model(images, noise=self.noise(images, self.masks_generator(batch))).loss

    def eval_sums(self, model: nn.Module, batch: dict) -> Tensor:
        images, valid = batch["image"], batch["valid"]
        out = model(images, noise=self.noise(images, self._eval_generator(images.device)))
        weights = out.mask * valid[:, None]  # (batch, patches): the removed patches of real samples
        masked = weights.sum()
        # The model's own loss with padding weighted out is (sum of per-patch errors) / masked;
        # 0/0 (a batch of padding only) is NaN, and counts nothing.
        mean = getattr(model, "module", model).forward_loss(images, out.logits, weights)
        return sums(torch.nan_to_num(mean * masked), masked, valid)

    def flops(self, model_cfg: ModelConfig, batch_size: int) -> float:
        return mae_flops(model_cfg, batch_size)
