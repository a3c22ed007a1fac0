"""Per-batch augmentations on the device: random erasing, then mixup/cutmix (timm's meanings).

They run in the classification task on the normalized batch, as timm's prefetcher (erasing)
and training loop (mixup) do, so they add nothing to the data workers. Every random choice
(whether a sample is mixed or erased, lambda, boxes) is drawn on the HOST from generators
seeded by (train.seed, rank, epoch, batch number): a resumed run draws exactly what an
uninterrupted one drew, and nothing reads a device value (no host-device sync). Only the
erasing noise is drawn on the device, from a device generator reseeded the same way.

The draws follow timm's ``Mixup`` and ``RandomErasing`` call for call (numpy's legacy
``RandomState`` for mixup, Python's ``random.Random`` for erasing, the generators timm uses
globally), so with the same seed they give timm's lambdas and boxes; tests hold them to it.
The pixels are then changed in a few whole-batch operations (masks built from the boxes)
instead of timm's loop over samples. Partners are the batch's mirror image, sample i with
sample B-1-i, as in timm.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import Tensor

from pipeline.config import DataConfig
from pipeline.data.partition import mix_seed

ERASE_AREA = (0.02, 1 / 3)  # timm's RandomErasing defaults: fraction of the image per sample
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_ATTEMPTS = 10  # boxes that do not fit are drawn again, up to this many times


def step_seed(seed: int, tag: str, batch: dict, rank: int) -> int:
    """The host seed of one training batch's draws (a batch without position: a fixed stream)."""
    return mix_seed(seed, tag, rank, int(batch.get("epoch", -1)), int(batch.get("index", -1)))


class Mixup:
    """timm's ``Mixup`` (mixup/cutmix, modes batch/pair/elem, correct_lam, label smoothing)."""

    def __init__(self, *, mixup: float, cutmix: float, prob: float, switch_prob: float, mode: str,
                 label_smoothing: float, num_classes: int):
        self.mixup, self.cutmix, self.prob, self.switch_prob = mixup, cutmix, prob, switch_prob
        self.mode, self.smoothing, self.num_classes = mode, label_smoothing, num_classes

    def _lambda(self, rng: np.random.RandomState, n: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Mixing weights and cutmix flags for n samples (None: one for the batch), as timm draws them."""
        if n is None:
            if not rng.rand() < self.prob:
                return np.array(1.0), np.array(False)
            cut = self.cutmix > 0 and (self.mixup <= 0 or rng.rand() < self.switch_prob)
            return np.array(float(rng.beta(self.cutmix, self.cutmix) if cut else rng.beta(self.mixup, self.mixup))), \
                np.array(cut)
        if self.mixup > 0 and self.cutmix > 0:
            cut = rng.rand(n) < self.switch_prob
            cut_lam, mix_lam = rng.beta(self.cutmix, self.cutmix, size=n), rng.beta(self.mixup, self.mixup, size=n)
            lam = np.where(cut, cut_lam, mix_lam)
        elif self.mixup > 0:
            cut, lam = np.zeros(n, dtype=bool), rng.beta(self.mixup, self.mixup, size=n)
        else:
            cut, lam = np.ones(n, dtype=bool), rng.beta(self.cutmix, self.cutmix, size=n)
        lam = np.where(rng.rand(n) < self.prob, lam.astype(np.float32), np.float32(1.0))
        return lam, cut

    @staticmethod
    def _box(rng: np.random.RandomState, lam: float, height: int, width: int) -> tuple[tuple[int, ...], float]:
        """A cutmix box of area about (1 - lam), clipped to the image; lam corrected to the clipped area."""
        side = math.sqrt(1 - lam)
        cut_h, cut_w = int(height * side), int(width * side)
        cy, cx = rng.randint(0, height), rng.randint(0, width)
        y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
        x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
        return (int(y0), int(y1), int(x0), int(x1)), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)

    def draw(self, rng: np.random.RandomState, batch_size: int, height: int, width: int):
        """(lam, cut, boxes) on the host: per sample (arrays of batch_size), or scalars in batch mode."""
        if self.mode == "batch":
            lam, cut = self._lambda(rng, None)
            lam, cut = float(lam), bool(cut)
            if lam == 1.0:
                return 1.0, False, None
            if cut:
                box, lam = self._box(rng, lam, height, width)
                return lam, True, box
            return lam, False, None
        n = batch_size if self.mode == "elem" else batch_size // 2
        lam, cut = self._lambda(rng, n)
        boxes = np.zeros((n, 4), dtype=np.int64)
        for i in range(n):
            if lam[i] != 1.0 and cut[i]:
                box, lam[i] = self._box(rng, float(lam[i]), height, width)
                boxes[i] = box
        if self.mode == "pair":  # sample B-1-i is mixed like sample i
            lam, cut, boxes = (np.concatenate([a, a[::-1]]) for a in (lam, cut, boxes))
        return lam, cut, boxes

    def targets(self, labels: Tensor, lam) -> Tensor:
        """Soft targets (batch, classes) in fp32: smoothed one-hot, mixed with the mirror's."""
        off = self.smoothing / self.num_classes
        one_hot = torch.full((labels.shape[0], self.num_classes), off, device=labels.device, dtype=torch.float32)
        one_hot.scatter_(1, labels.long().view(-1, 1), 1.0 - self.smoothing + off)
        return one_hot * lam + one_hot.flip(0) * (1.0 - lam)

    def __call__(self, images: Tensor, labels: Tensor, rng: np.random.RandomState) -> tuple[Tensor, Tensor]:
        lam, cut, boxes = self.draw(rng, images.shape[0], images.shape[-2], images.shape[-1])
        mirror = images.flip(0)
        if self.mode == "batch":
            if cut:
                y0, y1, x0, x1 = boxes
                images = images.clone()
                images[:, :, y0:y1, x0:x1] = mirror[:, :, y0:y1, x0:x1]
            elif lam != 1.0:
                images = images * lam + mirror * (1.0 - lam)
            return images, self.targets(labels, lam)
        device = images.device
        # Weights computed in float64 on the host and rounded once: timm's float32 (1 - lam) exactly.
        weights = torch.tensor(np.stack([np.where(cut, 1.0, lam), np.where(cut, 0.0, 1.0 - lam.astype(np.float64))]),
                               dtype=torch.float32, device=device)  # (2, batch)
        mixed = (images * weights[0, :, None, None, None] + mirror * weights[1, :, None, None, None]).to(images.dtype)
        if cut.any():  # known on the host: no device value is read
            inside = box_masks(torch.tensor(np.where(cut[:, None], boxes, 0), device=device),
                               images.shape[-2], images.shape[-1])  # (batch, 1, H, W)
            mixed = torch.where(inside, mirror, mixed)
        lam_t = torch.tensor(lam, dtype=torch.float32, device=device)[:, None]  # (batch, 1)
        return mixed, self.targets(labels, lam_t)


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """(batch, 4) boxes (y0, y1, x0, x1), on the device -> bool (batch, 1, H, W), True inside."""
    rows = torch.arange(height, device=boxes.device)[None, :, None]
    cols = torch.arange(width, device=boxes.device)[None, None, :]
    y0, y1, x0, x1 = (boxes[:, k, None, None] for k in range(4))
    return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[:, None]


class RandomErase:
    """timm's ``RandomErasing`` on a normalized batch (probability, mode const/rand/pixel, 1..count boxes)."""

    def __init__(self, *, prob: float, mode: str, count: int):
        self.prob, self.mode, self.count = prob, mode, count

    def draw(self, rng: random.Random, batch_size: int, height: int, width: int) -> np.ndarray:
        """(count, batch, 4) boxes (y0, y1, x0, x1); an empty box (all 0) erases nothing."""
        boxes = np.zeros((self.count, batch_size, 4), dtype=np.int64)
        area = height * width
        for i in range(batch_size):
            if rng.random() > self.prob:
                continue
            count = 1 if self.count == 1 else rng.randint(1, self.count)
            for k in range(count):
                for _ in range(ERASE_ATTEMPTS):
                    target = rng.uniform(*ERASE_AREA) * area / count
                    aspect = math.exp(rng.uniform(*ERASE_LOG_ASPECT))
                    h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                    if w < width and h < height:
                        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                        boxes[k, i] = (top, top + h, left, left + w)
                        break
        return boxes

    def __call__(self, images: Tensor, rng: random.Random, generator: torch.Generator | None) -> Tensor:
        batch, channels, height, width = images.shape
        boxes = self.draw(rng, batch, height, width)
        if not boxes.any():
            return images
        on_device = torch.tensor(boxes, device=images.device)
        for k in range(self.count):  # later boxes of a sample are drawn over earlier ones, as in timm
            if not boxes[k].any():
                continue
            inside = box_masks(on_device[k], height, width)
            if self.mode == "pixel":
                fill = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            elif self.mode == "rand":
                fill = torch.randn((batch, channels, 1, 1), generator=generator, device=images.device,
                                   dtype=images.dtype)
            else:
                fill = torch.zeros((), device=images.device, dtype=images.dtype)
            images = torch.where(inside, fill, images)
        return images


class BatchAugment:
    """Erasing then mixup/cutmix for one training batch; ``None`` targets when nothing mixes."""

    def __init__(self, cfg: DataConfig, *, num_classes: int, label_smoothing: float, seed: int):
        self.seed = seed
        self.erase = RandomErase(prob=cfg.reprob, mode=cfg.remode, count=cfg.recount) if cfg.reprob > 0 else None
        self.mixup = (Mixup(mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                            mode=cfg.mixup_mode, label_smoothing=label_smoothing, num_classes=num_classes)
                      if cfg.mixes else None)
        self.generator: torch.Generator | None = None

    @staticmethod
    def wanted(cfg: DataConfig) -> bool:
        return cfg.reprob > 0 or cfg.mixes

    def _noise_generator(self, device: torch.device, seed: int) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)  # host-side: no device value read
        return self.generator

    def __call__(self, images: Tensor, labels: Tensor, batch: dict, rank: int) -> tuple[Tensor, Tensor | None]:
        if self.erase is not None:
            rng = random.Random(step_seed(self.seed, "erase", batch, rank))
            noise = self._noise_generator(images.device, step_seed(self.seed, "erase-noise", batch, rank))
            images = self.erase(images, rng, noise)
        if self.mixup is None:
            return images, None
        rng = np.random.RandomState(step_seed(self.seed, "mixup", batch, rank) % 2**32)
        return self.mixup(images, labels, rng)
