"""JPEG shards like ImageNet's for ``make gpu-check``: class folders of photo-sized JPEGs, sharded
by ``write_shards`` (what ``make_shards`` runs).

The images are synthetic but cost what photos cost: a smooth colour field with texture,
encoded at quality 90 (about the bytes per pixel of ImageNet's JPEGs), so that decoding and
RandomResizedCrop in the workers take the time they take on real data.
"""
from __future__ import annotations

import math
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg

from pipeline.data.shards import write_shards


def synthetic_photo(index: int, label: int, height: int, width: int) -> torch.Tensor:
    """uint8 (3, height, width): a seeded colour field (low frequencies) plus texture (high ones),
    tinted by its class, so that short runs have something to learn (their losses fall)."""
    g = torch.Generator().manual_seed(index)
    tint = torch.rand(1, 3, 1, 1, generator=torch.Generator().manual_seed(10_000 + label)) * 160 - 80
    field = (torch.rand(1, 3, 6, 8, generator=g) * 160 + 48 + tint).clamp(0, 255)
    image = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=False)[0]
    texture = torch.randn(3, height, width, generator=g) * 18
    return (image + texture).clamp(0, 255).to(torch.uint8)


def _write_range(args: tuple[Path, int, int, int, int, int]) -> int:
    root, start, stop, height, width, classes = args
    torch.set_num_threads(1)
    for index in range(start, stop):
        folder = root / f"class{index % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = encode_jpeg(synthetic_photo(index, index % classes, height, width), quality=90)
        (folder / f"img{index:07d}.jpg").write_bytes(data.numpy().tobytes())
    return stop - start


def write_jpeg_shards(out: Path, *, images: int, height: int, width: int, shards: int, classes: int = 10,
                      workers: int = 1) -> Path:
    """``out/jpeg/<class>/*.jpg`` and ``out/shards/{train,val}-*.tar`` (4% held out, at least 2 per class);
    returns the shards directory."""
    source, shard_dir = out / "jpeg", out / "shards"
    if (shard_dir / "manifest.json").is_file():
        return shard_dir  # made by an earlier check on this machine: the same images
    chunk = math.ceil(images / max(1, workers * 4))
    jobs = [(source, start, min(images, start + chunk), height, width, classes) for start in range(0, images, chunk)]
    with get_context("spawn").Pool(max(1, workers)) as pool:
        assert sum(pool.map(_write_range, jobs)) == images
    val_fraction = max(0.04, 2 * classes / images)  # at least two validation images per class
    train_images = images * (1 - val_fraction)
    write_shards(str(source), shard_dir, shard_size=math.ceil(train_images / shards), val_fraction=val_fraction,
                 workers=max(1, workers))
    return shard_dir
