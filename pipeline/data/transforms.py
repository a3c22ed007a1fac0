"""Decoding and augmentation with torchvision (v2 transforms on uint8 tensors).

Images stay uint8 through decode, crop, flip, collation and the trip from the worker to the
main process (torchvision's uint8 resize kernels are the fast path, and a float batch costs
4x the shared memory, whose fresh pages cost more than the normalization itself); the main
process normalizes once per batch in :class:`NormalizeBatch`, into pinned memory when asked. Decoding uses ``torchvision.io.decode_image`` on a bytearray, which
measured faster than PIL here (FACTS.md); grayscale sources are expanded to the model's three
channels, colour ones reduced to one, by the decoder itself.
"""
from __future__ import annotations

import math

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from pipeline.config import AUGMENTS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")
_MODES = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}


def check_channels(num_channels: int) -> None:
    if num_channels not in _MODES:
        raise ValueError(f"num_channels must be 1 or 3 for image data, got {num_channels}")


def decode(data: bytes | bytearray, num_channels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (channels, height, width).

    A bytearray (what the shard reader returns) is wrapped as it is; bytes are copied once into
    one, because torch.frombuffer wants a writable buffer.
    """
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    image = decode_image(torch.frombuffer(buffer, dtype=torch.uint8), mode=_MODES[num_channels])
    return image[0] if image.ndim == 4 else image  # animated GIF: first frame


class CropFlip:
    """RandomResizedCrop + random horizontal flip through torchvision's functional kernels.

    The same sampling (``RandomResizedCrop.get_params``) and kernels as the v2 transforms,
    without their per-call dispatch (measured: about 35 us of 1.9 ms per ImageNet image).
    """

    def __init__(self, size: tuple[int, int], scale: tuple[float, float], hflip: bool,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio, self.hflip = list(size), list(scale), list(ratio), hflip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        image = F.resized_crop_image(image, top, left, height, width, self.size, antialias=True)
        if self.hflip and torch.rand(1).item() < 0.5:
            image = F.horizontal_flip_image(image)
        return image


def train_transform(image_size: tuple[int, int], *, augment: str, crop_scale: tuple[float, float],
                    hflip: bool, shift_pixels: int):
    """uint8 (C, h, w) of any size -> uint8 (C, H, W), randomly augmented."""
    if augment == "rrc":  # ImageNet-style: random area and aspect, resized to the model's size
        return CropFlip(image_size, crop_scale, hflip)
    if augment == "shift":  # small images (digits): resize, then shift by up to shift_pixels
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
    """uint8 (B, C, H, W) -> float32 (B, C, H, W): ``(x / 255 - mean) / std``."""

    def __init__(self, mean: list[float], std: list[float], num_channels: int):
        if len(mean) == 1:
            mean, std = mean * num_channels, std * num_channels
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(f"data.mean/data.std have {len(mean)} values but the model has "
                             f"{num_channels} channels; give {num_channels} values (or 1)")
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor, *, pin_memory: bool = False) -> torch.Tensor:
        out = torch.empty(images.shape, dtype=torch.float32, pin_memory=pin_memory)
        # copy_ first: a mixed uint8 x float multiply measured 6x slower than copy + float ops
        return out.copy_(images).mul_(self.scale).sub_(self.shift)
