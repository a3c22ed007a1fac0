"""The random masks of masked-image pretraining, drawn from a caller's ``torch.Generator``.

Both are pure functions of the generator's state: the same seed gives the same masks, on the
generator's device (CUDA generators draw on the GPU, with no host synchronisation), so a
training loop that seeds one generator per step reproduces every mask on resume.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def mae_noise(batch_size: int, num_patches: int, *, generator: torch.Generator) -> Tensor:
    """MAE's ``noise`` (batch, patches), uniform in [0, 1): the model keeps the patches with the
    smallest values (HF's ``ViTMAEForPreTraining(pixel_values, noise=...)``)."""
    return torch.rand(batch_size, num_patches, generator=generator, device=generator.device)


def num_masked_blocks(num_blocks: int, mask_ratio: float) -> int:
    """ceil(num_blocks * mask_ratio), as the SimMIM paper's generator counts; the 1e-9 keeps a product
    that is an integer up to float error (25 * 0.28 = 7.000000000000001) from rounding up."""
    return math.ceil(num_blocks * mask_ratio - 1e-9)


def simmim_mask(batch_size: int, *, image_size: int | tuple[int, int], patch_size: int | tuple[int, int],
                mask_patch_size: int, mask_ratio: float, generator: torch.Generator) -> Tensor:
    """SimMIM's mask: the image is cut into ``mask_patch_size`` blocks, a uniformly random
    ``num_masked_blocks`` of them per sample are masked, and each block covers
    (mask_patch_size / patch_h) x (mask_patch_size / patch_w) model patches.

    Returns ``bool_masked_pos`` (batch, patches), True = masked, patches in row-major order.
    """
    (height, width), (patch_h, patch_w) = _pair(image_size), _pair(patch_size)
    if mask_patch_size <= 0 or height % mask_patch_size or width % mask_patch_size:
        raise ValueError(f"mask_patch_size {mask_patch_size} must divide the image size {height}x{width}")
    if mask_patch_size % patch_h or mask_patch_size % patch_w:
        raise ValueError(f"mask_patch_size {mask_patch_size} must be a multiple of the patch size {patch_h}x{patch_w}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    blocks_h, blocks_w = height // mask_patch_size, width // mask_patch_size
    num_blocks = blocks_h * blocks_w
    # A random permutation per sample (argsort of uniform noise); its first entries are masked.
    order = torch.rand(batch_size, num_blocks, generator=generator, device=generator.device).argsort(dim=1)
    blocks = torch.zeros(batch_size, num_blocks, dtype=torch.bool, device=generator.device)
    blocks.scatter_(1, order[:, :num_masked_blocks(num_blocks, mask_ratio)], True)
    # (batch, blocks_h, blocks_w) -> (batch, grid_h, grid_w): each block over its model patches
    blocks = blocks.view(batch_size, blocks_h, blocks_w)
    patches = blocks.repeat_interleave(mask_patch_size // patch_h, 1).repeat_interleave(mask_patch_size // patch_w, 2)
    return patches.flatten(1)  # (batch, grid_h * grid_w)


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
