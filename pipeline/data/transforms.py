"""Decoding and augmentation with torchvision (v2 transforms on uint8 tensors).

Images stay uint8 through decode, crop and flip (torchvision's uint8 resize kernels are the
fast path); the float conversion and normalization happen once per batch in
:class:`NormalizeBatch`. Decoding uses ``torchvision.io.decode_image`` on a bytearray, which
measured faster than PIL here (FACTS.md); grayscale sources are expanded to the model's three
channels, colour ones reduced to one, by the decoder itself.
"""
from __future__ import annotations

import math

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")
AUGMENTS = ("rrc", "shift", "none")
_MODES = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}


def check_channels(num_channels: int) -> None:
    if num_channels not in _MODES:
        raise ValueError(f"num_channels must be 1 or 3 for image data, got {num_channels}")


def decode(data: bytes, num_channels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (channels, height, width)."""
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_MODES[num_channels])
    return image[0] if image.ndim == 4 else image  # animated GIF: first frame


def train_transform(image_size: tuple[int, int], *, augment: str, crop_scale: tuple[float, float],
                    hflip: bool, shift_pixels: int) -> v2.Compose:
    """uint8 (C, h, w) of any size -> uint8 (C, H, W), randomly augmented."""
    if augment == "rrc":  # ImageNet-style: random area and aspect, resized to the model's size
        steps = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
    elif augment == "shift":  # small images (digits): resize, then shift by up to shift_pixels
        steps = [v2.Resize(image_size, antialias=True), v2.RandomCrop(image_size, padding=shift_pixels)]
    elif augment == "none":
        steps = [v2.Resize(image_size, antialias=True)]
    else:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if hflip and augment != "none":
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(image_size: tuple[int, int], *, crop_pct: float) -> v2.Compose:
    """uint8 (C, h, w) -> uint8 (C, H, W): resize to size / crop_pct, then center crop."""
    height, width = image_size
    if height == width:
        resize = v2.Resize(math.floor(height / crop_pct), antialias=True)  # shorter side
    else:
        resize = v2.Resize((math.floor(height / crop_pct), math.floor(width / crop_pct)), antialias=True)
    return v2.Compose([resize, v2.CenterCrop(image_size)])


class NormalizeBatch:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W), ``(x / 255 - mean) / std`` in two in-place ops."""

    def __init__(self, mean: list[float], std: list[float], num_channels: int):
        if len(mean) == 1:
            mean, std = mean * num_channels, std * num_channels
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(f"data.mean/data.std have {len(mean)} values but the model has "
                             f"{num_channels} channels; give {num_channels} values (or 1)")
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32).mul_(self.scale).sub_(self.shift)
