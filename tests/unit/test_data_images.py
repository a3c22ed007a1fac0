"""Every decoded image reaches collate as uint8 with the model's channels and size, or is a counted bad sample."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset.writer import TarWriter

from pipeline.data.stages import BadSample, DecodeSample
from pipeline.data.transforms import Sized, decode, eval_transform
from pipeline.data import build_train_loader
from test_data_stream import data_cfg, take


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def odd_images() -> dict[str, tuple[str, bytes]]:
    """Images of every mode and depth a folder of real photos and scans may hold."""
    ramp16 = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500)  # up to 59,500
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8))
    frames = [Image.new("L", (10, 10), v) for v in (40, 200)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "gray16": ("png", encoded(Image.fromarray(ramp16))),  # I;16: decodes to uint16
        "palette": ("png", encoded(rgb.convert("P"))),
        "gray-alpha": ("png", encoded(Image.new("LA", (7, 11), (90, 30)))),
        "rgba": ("png", encoded(rgb.convert("RGBA"))),
        "cmyk": ("jpg", encoded(rgb.convert("CMYK"), "JPEG")),
        "bilevel": ("png", encoded(Image.new("1", (8, 8), 1))),
        "gray-jpeg": ("jpg", encoded(rgb.convert("L"), "JPEG")),
        "webp": ("webp", encoded(rgb, "WEBP")),  # decodes to RGB whatever mode is asked
        "one-pixel": ("png", encoded(Image.new("RGB", (1, 1), (1, 2, 3)))),
        "wide": ("png", encoded(Image.new("L", (200, 2), 77))),
        "animated": ("gif", gif.getvalue()),
    }


def write_odd_shard(root: Path) -> str:
    root.mkdir(parents=True)
    images = odd_images()
    with TarWriter(str(root / "train-000000.tar"), encoder=False, mtime=0) as writer:
        for key, (ext, data) in images.items():
            writer.write({"__key__": key, ext: data, "cls": b"1"})
    (root / "manifest.json").write_text(json.dumps({"shards": [{"name": "train-000000.tar",
                                                                "num_samples": len(images)}]}))
    return str(root / "train-000000.tar")


@pytest.mark.parametrize("channels", [1, 3])
def test_images_of_every_mode_and_depth_reach_the_batch(tmp_path, channels):
    pattern = write_odd_shard(tmp_path / "shards")
    config = data_cfg(pattern, batch_size=11, num_workers=0, mean=[0.5] * channels, std=[0.5] * channels)
    loader = build_train_loader(config, image_size=8, num_channels=channels, seed=0, rank=0, world_size=1)
    (batch,) = take(loader, 1)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (11, channels, 8, 8)
    assert sorted(batch["key"]) == sorted(odd_images()) and loader.state_dict()["bad"] == 0


def test_sixteen_bit_is_scaled_to_eight_bit_not_clipped():
    image = decode(odd_images()["gray16"][1], 1)
    expected = (np.arange(120).reshape(1, 12, 10) * 500 * 255 / 65535).round()
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(expected).to(torch.uint8))
    assert decode(odd_images()["webp"][1], 1).shape == (1, 9, 13)


def test_an_image_the_transform_cannot_size_is_a_bad_sample_not_a_collate_error():
    def broken(image):  # stands for any step that returns the wrong shape
        return image[:, :3, :3]

    decoder = DecodeSample(Sized(broken, (8, 8)), 1)
    sample = {"__key__": "k", "__url__": "shard.tar", "png": odd_images()["rgba"][1], "cls": b"1"}
    with pytest.raises(BadSample, match=r"k of shard shard.tar: image came out torch.uint8 \(1, 3, 3\), "
                                        r"expected uint8 \(1, 8, 8\)"):
        decoder(sample)
    assert decoder.take_bad_counts() == {"shard.tar": 1} and decoder.take_bad_counts() == {}
    good = DecodeSample(eval_transform((8, 8), crop_pct=1.0), 3)(sample)
    assert good["image"].shape == (3, 8, 8)
