"""Decoding and augmentation with torchvision (v2 transforms on uint8 tensors).

Images stay uint8 through decode, crop, flip, collation and the trip from the worker to the
main process (torchvision's uint8 resize kernels are the fast path, and a float batch costs
4x the shared memory, whose fresh pages cost more than the normalization itself); the trainer
normalizes each batch on its device (``device_feed.Normalize``).
Decoding uses ``torchvision.io.decode_image`` on a bytearray, which measured faster than PIL
here. :func:`decode` always returns uint8 with the model's channel count: 16-bit images are
scaled to 8 bits, alpha is dropped, grayscale is repeated to three channels and colour
reduced to one; anything else is refused, and the sample is counted as bad.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from pipeline.config import AUGMENTS

from .sources import IMAGE_CHANNELS

_MODES = dict(zip(IMAGE_CHANNELS, (ImageReadMode.GRAY, ImageReadMode.RGB)))


def check_channels(num_channels: int) -> None:
    if num_channels not in _MODES:
        raise ValueError(f"num_channels must be 1 or 3 for image data, got {num_channels}")


def decode(data: bytes | bytearray, num_channels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (num_channels, height, width); ValueError when unusable.

    A bytearray (what the shard reader returns) is wrapped as it is; bytes are copied once into
    one, because torch.frombuffer wants a writable buffer.
    """
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    image = decode_image(torch.frombuffer(buffer, dtype=torch.uint8), mode=_MODES[num_channels])
    if image.ndim == 4:  # animated GIF: first frame
        image = image[0]
    return to_model_image(image, num_channels)


def to_model_image(image: torch.Tensor, num_channels: int) -> torch.Tensor:
    """A decoded (C, H, W) image -> uint8 with ``num_channels`` channels, or ValueError saying why not.

    The decoder's mode request is not always honoured (a 16-bit PNG stays uint16, WebP stays
    RGB), and one odd image must not reach collate, where it would stop the run.
    """
    if image.ndim != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"decoded to shape {tuple(image.shape)}, not (channels, height, width)")
    if image.dtype == torch.uint16:
        # Scaled, not clipped: PIL's convert("L") clips 16-bit values at 255, which turns a
        # full-range image white. 65535 -> 255, rounded.
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise ValueError(f"pixel type {image.dtype} is not supported (8- or 16-bit images only)")
    channels = image.shape[0]
    if channels in (2, 4):  # gray + alpha, RGB + alpha: the alpha plane is dropped
        image, channels = image[:-1], channels - 1
    if channels == num_channels:
        return image
    if channels == 3 and num_channels == 1:
        return F.rgb_to_grayscale_image(image)
    if channels == 1 and num_channels == 3:
        return image.expand(3, -1, -1).contiguous()
    raise ValueError(f"has {image.shape[0]} channels, the model takes {num_channels}")


class Sized:
    """A transform and the (height, width) of what it returns: each sample is checked against it."""

    def __init__(self, transform, size: tuple[int, int]):
        self.transform, self.size = transform, tuple(size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image)


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


class RandAugment:
    """timm's RandAugment (``data.auto_augment``, e.g. "rand-m9-mstd0.5-inc1") on a uint8 tensor.

    timm's own transform (``rand_augment_transform``, with the hyperparameters its
    ``create_transform`` gives it: translate 0.45 x the shorter side, fill = the dataset mean,
    bicubic as in the DeiT and MAE recipes) runs on a PIL view of the image. timm draws from
    Python's and numpy's global generators; both are seeded from torch's generator, which the
    decoder seeds per sample (seed, epoch, sample, copy), so a sample's ops and magnitudes do not
    depend on the worker nor on where a resume started. In the main process (no workers) the
    global generators are put back afterwards: the trainer's own draws stay its own.
    """

    def __init__(self, spec: str, image_size: tuple[int, int], mean: tuple[float, ...]):
        self.spec = spec
        fill = tuple(min(255, round(255 * m)) for m in mean)
        self.hparams = {"translate_const": int(min(image_size) * 0.45), "img_mean": fill if len(fill) > 1 else fill[0]}
        self._transform = None  # built on first use, in the process that uses it (workers may spawn)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_transform": None}

    def build(self):
        if self._transform is None:
            from PIL import Image
            from timm.data import auto_augment
            transform = auto_augment.rand_augment_transform(self.spec, {**self.hparams, "interpolation": Image.BICUBIC})
            for op in transform.ops:  # Pillow >= 10 refuses 0 bits, which "inc" posterize reaches at magnitude 10
                if op.aug_fn is auto_augment.posterize:
                    op.aug_fn = posterize
            self._transform = transform
        return self._transform

    def apply_seeded(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """The transform with Python's and numpy's generators seeded by ``seed`` (what timm draws from)."""
        transform = self.build()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return from_pil(transform(to_pil(image)))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(2**62, (1,)))  # torch's generator: seeded per sample by the decoder
        saved = (random.getstate(), np.random.get_state()) if get_worker_info() is None else None
        try:
            return self.apply_seeded(image, seed)
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])


def to_pil(image: torch.Tensor):
    """uint8 (C, H, W) -> PIL "L" or "RGB": the planes merged by PIL (measured: 7x faster than a permuted copy)."""
    from PIL import Image
    image = image.contiguous()
    height, width = image.shape[1:]
    planes = [Image.frombuffer("L", (width, height), plane.numpy(), "raw", "L", 0, 1) for plane in image]
    return planes[0] if len(planes) == 1 else Image.merge("RGB", planes)


def from_pil(pil) -> torch.Tensor:
    """PIL "L" or "RGB" -> uint8 (C, H, W), split into planes by PIL (no permuted copy)."""
    return torch.from_numpy(np.stack([np.asarray(plane) for plane in pil.split()]))


def posterize(image, bits_to_keep: int, **_):
    """timm's posterize with Pillow's old meaning of 0 bits (a black image; Pillow >= 10 raises)."""
    from PIL import Image, ImageOps
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size, 0)
    return ImageOps.posterize(image, bits_to_keep)


class Then:
    """Two transforms in a row (picklable)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(image))


def train_transform(image_size: tuple[int, int], *, augment: str, crop_scale: tuple[float, float],
                    hflip: bool, shift_pixels: int, auto_augment: str | None = None,
                    mean: tuple[float, ...] = (0.5,)):
    """uint8 (C, h, w) of any size -> uint8 (C, H, W), randomly augmented (then RandAugment, as in timm)."""
    sized = _geometric(image_size, augment=augment, crop_scale=crop_scale, hflip=hflip, shift_pixels=shift_pixels)
    if auto_augment:
        return Sized(Then(sized.transform, RandAugment(auto_augment, image_size, tuple(mean))), image_size)
    return sized


def _geometric(image_size: tuple[int, int], *, augment: str, crop_scale: tuple[float, float], hflip: bool,
               shift_pixels: int) -> Sized:
    if augment == "rrc":  # ImageNet-style: random area and aspect, resized to the model's size
        return Sized(CropFlip(image_size, crop_scale, hflip), image_size)
    if augment == "shift":  # small images (digits): resize, then shift by up to shift_pixels
        steps = [v2.Resize(image_size, antialias=True), v2.RandomCrop(image_size, padding=shift_pixels)]
    elif augment == "none":
        steps = [v2.Resize(image_size, antialias=True)]
    else:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if hflip and augment != "none":
        steps.append(v2.RandomHorizontalFlip())
    return Sized(v2.Compose(steps), image_size)


def eval_transform(image_size: tuple[int, int], *, crop_pct: float) -> Sized:
    """uint8 (C, h, w) -> uint8 (C, H, W): resize to size / crop_pct, then center crop."""
    height, width = image_size
    if height == width:
        resize = v2.Resize(math.floor(height / crop_pct), antialias=True)  # shorter side
    else:
        resize = v2.Resize((math.floor(height / crop_pct), math.floor(width / crop_pct)), antialias=True)
    return Sized(v2.Compose([resize, v2.CenterCrop(image_size)]), image_size)

