"""What an export needs beside the weights for HF's tools to use it as the run did.

- ``id2label``/``label2id``: the class names of the manifest of the run's training shards (the
  run's ``config.yaml`` says which shards; relative paths are taken from the current directory).
- ``preprocessor_config.json``: the run's evaluation transform as a standard HF image processor.
  ``ViTImageProcessor`` cannot express it (it resizes to a square and never crops), so it is
  ``BitImageProcessor``: shorter side to ``image_size / crop_pct`` (bilinear), center crop to
  ``image_size``, then ``(x / 255 - mean) / std``, which is what ``transforms.eval_transform`` and
  the trainer's normalization do.
- Input channels: transformers' image pipeline always hands the model RGB. A model trained on one
  channel is exported with three, its patch weights split by the luma weights with which the
  loader turned colour images into gray, so an RGB or gray image gives the logits of training
  (``rgb_input=False`` keeps the single channel instead).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch

from pipeline.config import Config, ConfigError, DataConfig, load_config
from pipeline.data.sources import manifest_classes, manifest_of, manifest_says_unlabeled
from pipeline.errors import UserError, os_reason
from pipeline.model import ViTForImageClassification, build_model, save_pretrained

log = logging.getLogger(__name__)

PREPROCESSOR_NAME = "preprocessor_config.json"
PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, the value transformers stores as "resample"
# torchvision's rgb_to_grayscale (ITU-R 601-2 luma), what the loader uses for 1-channel models.
LUMA = (0.2989, 0.587, 0.114)
PATCH_WEIGHT = "vit.embeddings.patch_embeddings.projection.weight"


class ExportError(UserError):
    """An export that cannot be written as asked; the message names the path and the fix."""


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir``, created if missing; refused when it is a file or cannot be created."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out '{out_dir}' is a file; give a directory (it is created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot create --out '{out_dir}': {os_reason(error)}; give a writable directory") from None
    return out_dir


def run_config(tag_dir: Path) -> Config | None:
    """The config the run wrote beside its checkpoints (<output_dir>/config.yaml), or None."""
    path = Path(tag_dir).parent.parent / "config.yaml"
    if not path.is_file():
        log.warning("no %s beside the checkpoints: the export gets no class names and no image processor", path)
        return None
    try:
        return load_config(path)
    except ConfigError as error:
        log.warning("%s cannot be read (%s): the export gets no class names and no image processor", path, error)
        return None


def image_processor_config(data: DataConfig, image_hw: tuple[int, int], num_channels: int) -> dict:
    """``preprocessor_config.json`` for transformers' BitImageProcessor: the evaluation transform."""
    height, width = image_hw
    if height == width:  # eval_transform resizes the shorter side and keeps the aspect ratio
        size = {"shortest_edge": math.floor(height / data.crop_pct)}
    else:
        size = {"height": math.floor(height / data.crop_pct), "width": math.floor(width / data.crop_pct)}
    mean, std = list(data.mean), list(data.std)
    if len(mean) == 1:
        mean, std = mean * num_channels, std * num_channels
    return {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": size,
            "resample": PIL_BILINEAR, "do_center_crop": True, "crop_size": {"height": height, "width": width},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
            "image_std": std, "do_convert_rgb": num_channels == 3}


def gray_to_rgb(model: ViTForImageClassification) -> ViTForImageClassification:
    """The same classifier taking RGB: the 1-channel patch weights split by ``LUMA`` (summing to 1)."""
    rgb = build_model(dataclasses.replace(model.config, num_channels=3))
    state = model.state_dict()
    weights = torch.tensor(LUMA, dtype=state[PATCH_WEIGHT].dtype)
    state[PATCH_WEIGHT] = state[PATCH_WEIGHT] * (weights / weights.sum()).view(1, 3, 1, 1)  # (hidden, 3, p, p)
    rgb.load_state_dict(state)
    return rgb.eval()


def export_model(model: ViTForImageClassification, out_dir: Path, *, run: Config | None,
                 rgb_input: bool = True) -> None:
    """Write the HF directory: weights and config.json with the class names, and the image processor."""
    classes = None
    if run is not None:
        manifest = manifest_of(run.data.train_shards, run.data.manifest)
        found = manifest_classes(manifest)
        if found is None and manifest_says_unlabeled(manifest):
            log.info("the shards %s are unlabeled (their manifest.json says \"labeled\": false): id2label stays "
                     "LABEL_<i>", run.data.train_shards)
        elif found is None:
            log.warning("no manifest.json with class names for %s: id2label stays LABEL_<i>", run.data.train_shards)
        else:
            classes = found[0]
    if rgb_input and model.config.num_channels == 1:
        log.info("a 1-channel model: exported with RGB input (patch weights split by luma %s)", LUMA)
        model = gray_to_rgb(model)
    try:
        save_pretrained(model, out_dir, labels=classes)
        if run is not None:
            processor = image_processor_config(run.data, model.config.image_hw, model.config.num_channels)
            (Path(out_dir) / PREPROCESSOR_NAME).write_text(json.dumps(processor, indent=2) + "\n")
    except OSError as error:
        where = getattr(error, "filename", None) or out_dir
        raise ExportError(f"could not write the export to '{where}': {os_reason(error)}") from None
