"""SimMIM pretraining (Xie et al., 2021): HF's ViTForMaskedImageModeling with the paper's block masks."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.model import ViTForMaskedImageModeling, simmim_flops, simmim_mask
from pipeline.tasks.base import ENCODER_SHAPE_FIELDS
from pipeline.tasks.masked import MaskedImageTask, sums


class SimMIMTask(MaskedImageTask):
    name = "simmim"
    shape_fields = (*ENCODER_SHAPE_FIELDS, "encoder_stride")  # the decoder conv's stride^2 * channels

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        return ViTForMaskedImageModeling(model_cfg)

    def mask(self, images: Tensor, generator: torch.Generator) -> Tensor:
        m = self.model_cfg
        return simmim_mask(images.shape[0], image_size=m.image_hw, patch_size=m.patch_hw,
                           mask_patch_size=m.mask_patch_size, mask_ratio=m.simmim_mask_ratio,
                           generator=generator)  # (batch, patches), True = masked

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        images = batch["image"]
        return model(images, bool_masked_pos=self.mask(images, self.masks_generator(batch))).loss

    def eval_sums(self, model: nn.Module, batch: dict) -> Tensor:
        images, valid = batch["image"], batch["valid"]
        masked_pos = self.mask(images, self._eval_generator(images.device)) & valid[:, None]  # real samples only
        loss = model(images, bool_masked_pos=masked_pos).loss
        patch_h, patch_w = self.model_cfg.patch_hw
        pixels = masked_pos.sum() * (patch_h * patch_w)
        # HF's loss is sum(|error| over masked pixels and channels) / (pixels + 1e-5) / channels:
        # times (pixels + 1e-5) it is that sum per channel, and 0 for a batch of padding only.
        return sums(loss.double() * (pixels.double() + 1e-5), pixels, valid)

    def flops(self, model_cfg: ModelConfig, batch_size: int) -> float:
        return simmim_flops(model_cfg, batch_size)
