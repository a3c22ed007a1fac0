"""Consolidate a sharded DeepSpeed checkpoint into fp32 weights in HuggingFace's format.

The shards are read with ``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot
run code on the machine that exports it. DeepSpeed's own ``zero_to_fp32`` unpickles everything
(``weights_only=False``), so the few lines of its reconstruction that ZeRO 1-3 need live here;
the tests hold them to DeepSpeed's result, bit for bit.

What HF's tools need beside the weights comes from the run (``export_meta.py``): the class
names of the shards' manifest and an image processor that repeats the evaluation transform, so
that ``transformers.pipeline("image-classification", model=DIR)`` classifies as the run did.

A checkpoint exports as the model its objective trained (the marker's ``task``):
ViTForImageClassification, ViTMAEForPreTraining (mae) or ViTForMaskedImageModeling (simmim).
``encoder_only`` writes the encoder alone, for fine-tuning: a ViTModel (no pooler), or with
``num_labels`` a ViTForImageClassification whose classifier is new (seeded, random).
``ema`` exports the exponential moving average of the weights (``train.ema_decay``) instead:
the optimizer state ``"ema"`` of each rank's flat fp32 partition (ZeRO 1-3), consolidated as the
weights are, or the client state's (ZeRO-0).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch

from pipeline.checkpoint.store import CheckpointError, find_checkpoint, read_marker
from pipeline.config import ModelConfig
from pipeline.distributed.ema import EMA_KEY
from pipeline.checkpoint.export_meta import ExportError, check_out_dir, export_model, run_config
from pipeline.model import ViTForImageClassification, ViTModel
from pipeline.model.hf import ARCHITECTURES, NOT_ENCODER_KEYS

log = logging.getLogger(__name__)

# The model each objective (a checkpoint marker's "task") trains, by HF's class name.
TASK_ARCHITECTURES = {"classification": "ViTForImageClassification", "mae": "ViTMAEForPreTraining",
                      "simmim": "ViTForMaskedImageModeling"}


def encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a full model's state dict (names kept, ``vit.`` included): the same
    names whatever the objective, so one objective's encoder loads into another's model."""
    return {k: v for k, v in state.items() if k.startswith("vit.") and not k.startswith(NOT_ENCODER_KEYS)}

# The non-tensor objects DeepSpeed (and our LR schedule) pickle into checkpoints. Export needs
# none of their behaviour, so they unpickle as inert records instead of the real classes.
PICKLED_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.checkpoint.constants.ZeroStageEnum",
    "pipeline.config.OptimConfig",  # checkpoints written before pipeline/config/ became a package
    "pipeline.config.sections.OptimConfig",
)


class _Record:
    """Stands in for a pickled class: keeps constructor arguments and state, runs nothing."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def load_weights_only(path: Path) -> dict:
    """``torch.load(weights_only=True)`` of a DeepSpeed file; plain data and tensors only."""
    try:
        with torch.serialization.safe_globals([(_Record, name) for name in PICKLED_CLASSES]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"'{path}' cannot be read as weights only ({first}); it holds objects this "
                              "exporter does not know: was it written by this pipeline?") from None



def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _files(tag_dir: Path, pattern: str) -> list[Path]:
    found = sorted(tag_dir.glob(pattern), key=_natural)
    if not found:
        raise CheckpointError(f"checkpoint '{tag_dir}' has no {pattern} files; it is incomplete or not DeepSpeed's")
    return found


def _stage_of(value) -> int:
    return int(value.args[0]) if isinstance(value, _Record) else int(value)


def _no_ema(tag_dir: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint '{tag_dir}' holds no EMA of the weights (it was trained with "
                           "train.ema_decay=0); export it without --ema")


def _ema_partitions(tag_dir: Path, optim_states: list[dict], stage: int) -> list[list[torch.Tensor]]:
    """Each rank's EMA partitions, laid out as the fp32 partitions the merges below take."""
    ranks = []
    for optim in optim_states:
        base = optim["base_optimizer_state" if stage <= 2 else "optimizer_state_dict"]["state"]
        if not base or any(EMA_KEY not in state for state in base.values()):
            raise _no_ema(tag_dir)
        groups = [base[index][EMA_KEY] for index in sorted(base)]  # one flat partition per index, in order
        if stage <= 2:  # saved with DeepSpeed's alignment padding, which its fp32 partitions are saved without
            groups = [g[:g.numel() - pad] for g, pad in zip(groups, optim["group_paddings"])]
        ranks.append(groups)
    return ranks


def consolidated_state_dict(tag_dir: Path, zero_stage: int, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 weights (or with ``ema`` their average), whatever the ZeRO stage the checkpoint was
    written with."""
    tag_dir = Path(tag_dir)
    if zero_stage == 0:
        # Every rank holds the whole model (fp32 here: bf16 at ZeRO-0 runs in autocast).
        state = load_weights_only(tag_dir / "mp_rank_00_model_states.pt")
        if ema and EMA_KEY not in state:
            raise _no_ema(tag_dir)
        average = state[EMA_KEY] if ema else {}
        return OrderedDict((k, average.get(k, v).float()) for k, v in state["module"].items())
    model_states = [load_weights_only(p) for p in _files(tag_dir, "*_model_states.pt")]
    optim_states = [load_weights_only(p)["optimizer_state_dict"] for p in _files(tag_dir, "*_optim_states.pt")]
    stage = _stage_of(optim_states[0]["zero_stage"])
    if stage != zero_stage:
        raise CheckpointError(f"checkpoint '{tag_dir}' holds ZeRO-{stage} shards but its marker says ZeRO-{zero_stage}")
    world_size = optim_states[0]["partition_count"]
    world_size = max(world_size) if isinstance(world_size, (list, tuple)) else int(world_size)
    if world_size != len(optim_states):
        raise CheckpointError(f"checkpoint '{tag_dir}' should hold {world_size} optimizer shards but has "
                              f"{len(optim_states)}; it was not saved completely")
    model = model_states[0]
    state: dict[str, torch.Tensor] = OrderedDict(
        (k, v.float() if v.is_floating_point() else v) for k, v in model["module"].items() if k in model["buffer_names"])
    if model.get("frozen_param_shapes"):
        raise CheckpointError(f"checkpoint '{tag_dir}' has frozen parameters, which this exporter does not handle")
    if ema:
        partitions = _ema_partitions(tag_dir, optim_states, stage)
    else:
        partitions = [o["single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"] for o in optim_states]
    if stage <= 2:
        state.update(_merge_zero12(model["param_shapes"], partitions, optim_states[0].get("param_alignment_paddings"),
                                   world_size))
    else:
        state.update(_merge_zero3(model["param_shapes"], partitions, world_size))
    for alias, source in model.get("shared_params", {}).items():
        if source in state:
            state[alias] = state[source]
    return state


def _merge_zero12(param_shapes: list[dict], flat_groups: list[list[torch.Tensor]], paddings, world_size: int):
    """ZeRO 1/2: each param group is one flat fp32 vector cut into equal slices, one per rank."""
    out = OrderedDict()
    for group, shapes in enumerate(param_shapes):
        flat = torch.cat([ranks[group] for ranks in flat_groups])
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            out[name] = flat.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (paddings[group][index] if paddings is not None else 0)
        align = 2 * world_size  # DeepSpeed pads each group to a multiple of 2 x world size
        if math.ceil(offset / align) * align != math.ceil(flat.numel() / align) * align:
            raise CheckpointError(f"ZeRO group {group}: used {offset} of {flat.numel()} values; the shards do not "
                                  "match the recorded parameter shapes")
    return out


def _merge_zero3(param_shapes: list[dict], flat_groups: list[list[torch.Tensor]], world_size: int):
    """ZeRO 3: every parameter is split over the ranks (padded to a multiple of the world size),
    and each rank's pieces follow one another in its flat vector(s)."""
    per_rank = [torch.cat(list(groups)) for groups in flat_groups]
    out = OrderedDict()
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world_size)
            pieces = [flat.narrow(0, offset, part) for flat in per_rank]
            out[name] = torch.cat(pieces)[:numel].view(shape).clone()
            offset += part
    if offset != per_rank[0].numel():
        raise CheckpointError(f"ZeRO-3 shards: used {offset} of {per_rank[0].numel()} values per rank; the shards "
                              "do not match the recorded parameter shapes")
    return out


def trained_model(tag_dir: Path, *, ema: bool = False) -> torch.nn.Module:
    """The model a checkpoint's objective trained, with its consolidated fp32 weights (``ema``: their
    average), in eval mode."""
    marker = read_marker(tag_dir)
    model_cfg = ModelConfig(**{**marker["model"], "activation_checkpointing": "none"})
    task = marker.get("task", "classification")
    if task not in TASK_ARCHITECTURES:
        raise CheckpointError(f"checkpoint '{tag_dir}' was trained with objective '{task}', which this exporter does "
                              f"not know ({', '.join(TASK_ARCHITECTURES)})")
    model = ARCHITECTURES[TASK_ARCHITECTURES[task]](model_cfg)
    state = consolidated_state_dict(tag_dir, int(marker["zero_stage"]), ema=ema)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{tag_dir}' does not match its recorded model config: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def encoder_model(model: torch.nn.Module, num_labels: int | None) -> torch.nn.Module:
    """``model``'s encoder as a ViTModel without pooler, or a ViTForImageClassification with a new
    ``num_labels`` classifier (initialised from a fixed seed: the same export every time)."""
    encoder = encoder_keys(model.state_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if num_labels is None:
            target = ViTModel(model.config, add_pooling_layer=False)
            encoder = {k[len("vit."):]: v for k, v in encoder.items()}
        else:
            target = ViTForImageClassification(dataclasses.replace(model.config, num_labels=num_labels))
    missing, unexpected = target.load_state_dict(encoder, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise CheckpointError(f"the encoder does not fit a ViT of its own config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return target.eval()


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, rgb_input: bool = True,
                      encoder_only: bool = False, num_labels: int | None = None, ema: bool = False) -> Path:
    """Write ``config.json``, ``model.safetensors`` (fp32) and ``preprocessor_config.json`` for
    ``checkpoint`` into ``out_dir``: the objective's model, or with ``encoder_only`` its encoder
    (``num_labels``: as a classifier with a new head); ``ema``: the averaged weights. ``rgb_input``
    (classifiers only): see ``export_meta.export_model``."""
    if num_labels is not None and not encoder_only:
        raise ExportError(f"--num-labels {num_labels} needs --encoder-only: it puts a new classifier on the "
                          "checkpoint's encoder; a classification checkpoint keeps its own classifier without it")
    if num_labels is not None and num_labels < 1:
        raise ExportError(f"--num-labels {num_labels}: give a positive count of classes")
    tag_dir = find_checkpoint(checkpoint)
    out_dir = check_out_dir(out_dir)
    marker = read_marker(tag_dir)
    model = trained_model(tag_dir, ema=ema)
    if encoder_only:
        model = encoder_model(model, num_labels)
    # The RGB conversion is the classifier's (HF's image pipeline feeds it); a pretraining model
    # predicts pixels of its own channels, and a bare encoder keeps what it was trained on.
    export_model(model, out_dir, run=run_config(tag_dir),
                 rgb_input=rgb_input and isinstance(model, ViTForImageClassification))
    log.info("exported %s (%s, step %s, ZeRO-%s%s) as %s to %s", tag_dir, marker.get("task", "classification"),
             marker["step"], marker["zero_stage"], ", EMA weights" if ema else "", type(model).__name__, out_dir)
    return out_dir
