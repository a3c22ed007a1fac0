"""Where a run's first weights come from: its own checkpoint on resume, else a pretrained encoder
(``train.init_from``), else the task's random initialisation.

``train.init_from`` names a run directory or ``checkpoints/step-N`` of this pipeline (any
objective: classification, mae, simmim), or a directory in HF's format (``config.json`` and
weights: ViTModel, ViTForImageClassification, ViTMAEForPreTraining, ViTForMaskedImageModeling).
Only the encoder moves: the ``vit.*`` weights, without SimMIM's mask token and HF's pooler, which
belong to one objective's head. Every encoder weight of the new model must be found with the same
shape, and nothing else is accepted; the heads (a classifier, MAE's decoder) keep their random
initialisation. This is how a classifier is fine-tuned after MAE or SimMIM pretraining.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.checkpoint import CheckpointError, ResumePlan, read_marker
from pipeline.config import ConfigError
from pipeline.checkpoint.export import consolidated_state_dict, encoder_keys
from pipeline.checkpoint.store import find_checkpoint
from pipeline.model.hf import CONFIG_NAME, from_pretrained
from pipeline.tasks import Task

log = logging.getLogger(__name__)

def pretrained_encoder(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The encoder weights (fp32, CPU) of ``path`` and a description of where they came from."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"train.init_from={path}: no such path; give a run directory, a checkpoints/step-N "
                              "directory or an HF directory (config.json + model.safetensors)")
    if (path / CONFIG_NAME).is_file():
        try:
            model = from_pretrained(path)  # the class its config.json names; a ViTModel as our classifier
        except (ValueError, ConfigError, OSError) as error:
            raise CheckpointError(f"train.init_from={path}: {' '.join(str(error).split())}") from None
        # the class the directory declares (an --encoder-only export is a ViTModel, read by our classifier)
        declared = (json.loads((path / CONFIG_NAME).read_text()).get("architectures") or [type(model).__name__])[0]
        return encoder_keys(model.state_dict()), f"HF directory {path} ({declared})"
    tag_dir = find_checkpoint(path, what="train.init_from")
    marker = read_marker(tag_dir)
    state = consolidated_state_dict(tag_dir, int(marker["zero_stage"]))
    return encoder_keys(state), f"{tag_dir} ({marker.get('task', 'classification')}, step {marker.get('step')})"


def load_encoder(model: nn.Module, path: str | Path) -> list[str]:
    """Copy the encoder of ``path`` into ``model``; returns the names left to the model's own init."""
    source, where = pretrained_encoder(path)
    target = encoder_keys(model.state_dict())
    missing, unexpected = sorted(set(target) - set(source)), sorted(set(source) - set(target))
    mis_shaped = sorted(f"{k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}"
                        for k in set(source) & set(target) if source[k].shape != target[k].shape)
    if missing or unexpected or mis_shaped:
        raise CheckpointError(
            f"train.init_from={path}: its encoder does not fit this run's model: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, mis-shaped {mis_shaped[:4]}; give the model section the encoder's shape "
            "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, image_size, patch_size, "
            "num_channels, qkv_bias) as the pretrained model has it")
    with torch.no_grad():
        model.load_state_dict(source, strict=False)
    fresh = sorted({k.split(".")[0] for k in model.state_dict() if k not in source})
    log.info("train.init_from: %d encoder tensors from %s; newly initialised: %s", len(source), where,
             ", ".join(fresh) or "nothing")
    return fresh


def starting_weights(model: nn.Module, *, task: Task, init_from: str | None, plan: ResumePlan | None) -> None:
    """Before the engine is built: a resumed run loads everything later, from a checkpoint of the
    same objective; otherwise ``init_from`` (if set) replaces the encoder's random weights."""
    if plan is not None:
        saved = plan.marker.get("task", "classification")
        if saved != task.name:
            raise CheckpointError(f"checkpoint '{plan.tag_dir}' was trained with train.objective={saved}, not "
                                  f"{task.name}; set train.objective={saved} to continue it, or start a new "
                                  f"train.output_dir with train.init_from={plan.tag_dir} to take its encoder")
        if init_from:
            log.info("resuming %s: train.init_from is not applied again", plan.tag_dir.name)
        return
    if init_from:
        load_encoder(model, init_from)
