"""Consolidate a sharded DeepSpeed checkpoint into fp32 weights in HuggingFace's format."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointError, complete_checkpoints, read_marker, step_of
from pipeline.config import ModelConfig
from pipeline.model import build_model, save_pretrained

log = logging.getLogger(__name__)


def find_checkpoint(path: str | Path) -> Path:
    """A step-N directory as given, or the newest complete one of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist; give a run's output_dir or one of its checkpoints/step-N")
    if step_of(path) is not None:
        read_marker(path)
        return path
    root = path if path.name == "checkpoints" else path / "checkpoints"
    found = complete_checkpoints(root)
    if not found:
        raise CheckpointError(f"no complete checkpoint under '{root}'; train first or give a step-N directory")
    return found[-1]


def consolidated_state_dict(tag_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights, whatever the ZeRO stage the checkpoint was written with."""
    if zero_stage == 0:
        # Every rank holds the whole model: it sits in the one model-states file.
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    tag_dir = find_checkpoint(checkpoint)
    marker = read_marker(tag_dir)
    model_cfg = ModelConfig(**marker["model"])
    model = build_model(model_cfg)
    state = consolidated_state_dict(tag_dir, int(marker["zero_stage"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{tag_dir}' does not match its recorded model config: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    save_pretrained(model, out_dir)
    log.info("exported %s (step %s) to %s", tag_dir, marker["step"], out_dir)
    return Path(out_dir)
