"""Reading and writing HuggingFace's on-disk format: ``config.json`` + ``model.safetensors``.

A directory written by transformers' ``save_pretrained`` (ViTForImageClassification, or a bare
ViTModel whose keys lack the ``vit.`` prefix) loads here, and what ``save_pretrained`` writes here
loads in ``transformers.ViTForImageClassification.from_pretrained``. The pretraining models go both
ways too: ``ViTMAEForPreTraining`` (model_type "vit_mae") and ``ViTForMaskedImageModeling`` (SimMIM),
chosen with ``architecture=``. transformers is not imported.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline.config import DEFAULT_SIZE, MODEL_SIZES, ConfigError, ModelConfig
from pipeline.model.heads import ViTForImageClassification
from pipeline.model.mae import ViTMAEForPreTraining
from pipeline.model.simmim import ViTForMaskedImageModeling
from pipeline.model.vit import ViTModel

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"

# ViTConfig's own fields; everything else in an HF config.json (dtype, versions, ...) is ignored.
HF_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
             "image_size", "patch_size", "num_channels", "qkv_bias", "encoder_stride", "pooler_output_size",
             "pooler_act")
# transformers' ViTMAEConfig fields (its config.json has model_type "vit_mae").
MAE_HF_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
                 "image_size", "patch_size", "num_channels", "qkv_bias", "decoder_num_attention_heads",
                 "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_intermediate_size", "mask_ratio",
                 "norm_pix_loss")
# SimMIM's mask settings are no ViTConfig fields; config.json carries them beside those (transformers
# keeps unknown keys as plain attributes), so our own round trip is exact.
MIM_EXTRA_FIELDS = ("mask_patch_size", "simmim_mask_ratio")
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "ViTForImageClassification": ViTForImageClassification,
    "ViTMAEForPreTraining": ViTMAEForPreTraining,
    "ViTForMaskedImageModeling": ViTForMaskedImageModeling,
}
HF_DEFAULT_NUM_LABELS = 2  # what transformers assumes when config.json has no id2label / num_labels

# Inside ``vit.`` but not the encoder's (HF's pooler, SimMIM's mask token): weights our classifier
# has no place for, skipped on load as transformers does, and left out of an encoder's weights.
NOT_ENCODER_KEYS = ("vit.pooler.", "vit.embeddings.mask_token")


def config_to_hf(cfg: ModelConfig, *, architecture: str = "ViTForImageClassification",
                 labels: list[str] | None = None) -> dict[str, Any]:
    """Our ModelConfig as the dictionary transformers writes to config.json for ``architecture``.

    ``labels`` names the classes (a dataset's class names) for the classifier's ``id2label``;
    classes beyond them, or all without them, get transformers' ``LABEL_<i>``.
    """
    if architecture == "ViTMAEForPreTraining":
        return {**{name: getattr(cfg, name) for name in MAE_HF_FIELDS}, "model_type": "vit_mae",
                "architectures": [architecture]}
    hf: dict[str, Any] = {name: getattr(cfg, name) for name in HF_FIELDS}
    hf["pooler_output_size"] = cfg.pooler_output_size or cfg.hidden_size  # HF stores the resolved size
    hf["model_type"] = "vit"
    hf["architectures"] = [architecture]
    if architecture == "ViTForImageClassification":
        names = _label_names(labels or [], cfg.num_labels)
        hf["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf["label2id"] = {name: i for i, name in enumerate(names)}
    if architecture == "ViTForMaskedImageModeling":
        hf.update({name: getattr(cfg, name) for name in MIM_EXTRA_FIELDS})
    return hf


def config_from_hf(hf: dict[str, Any], *, architecture: str = "ViTForImageClassification",
                   **overrides: Any) -> ModelConfig:
    """A ModelConfig from an HF config.json dictionary; ``overrides`` set our extra fields (e.g.
    activation_checkpointing) or replace HF values (e.g. num_labels). Fields that ``architecture``
    does not use (labels for the pretraining models, the decoder for ViT) keep our defaults."""
    if architecture == "ViTMAEForPreTraining":
        if hf.get("model_type", "vit_mae") != "vit_mae":
            raise ConfigError(f"model_type is '{hf['model_type']}', not 'vit_mae'; ViTMAEForPreTraining loads "
                              "only MAE checkpoints")
        return ModelConfig(**{**{name: hf[name] for name in MAE_HF_FIELDS if name in hf}, **overrides})
    if hf.get("model_type", "vit") != "vit":
        raise ConfigError(f"model_type is '{hf['model_type']}', not 'vit'; only ViT checkpoints are supported")
    values = {name: hf[name] for name in HF_FIELDS if name in hf}
    # (ModelConfig's shape fields default to None, "from the size": B/16 when no size is named.)
    if values.get("pooler_output_size") == values.get("hidden_size", MODEL_SIZES[DEFAULT_SIZE]["hidden_size"]):
        values["pooler_output_size"] = None  # our "same as hidden_size", so the round trip is exact
    if architecture == "ViTForMaskedImageModeling":
        values.update({name: hf[name] for name in MIM_EXTRA_FIELDS if name in hf})
    else:
        values["num_labels"] = _hf_num_labels(hf)
    values.update(overrides)
    return ModelConfig(**values)


def _label_names(labels: list[str], num_labels: int) -> list[str]:
    names = [str(name) for name in labels[:num_labels]] + [f"LABEL_{i}" for i in range(len(labels), num_labels)]
    if len(set(names)) != len(names):  # label2id needs distinct names
        raise ValueError(f"class names must be distinct for id2label/label2id, got {names[:10]}")
    return names


def _hf_num_labels(hf: dict[str, Any]) -> int:
    return len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", HF_DEFAULT_NUM_LABELS)


def save_pretrained(model: nn.Module, directory: str | Path, *, labels: list[str] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` in transformers' layout into ``directory``:
    a ViTForImageClassification, ViTModel, ViTMAEForPreTraining or ViTForMaskedImageModeling.
    ``labels``: the classifier's class names (see ``config_to_hf``)."""
    if not isinstance(model, (ViTModel, *ARCHITECTURES.values())):
        raise TypeError(f"save_pretrained takes a {', '.join(ARCHITECTURES)} or ViTModel, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(model.config, architecture=type(model).__name__, labels=labels)
    backbone = model if isinstance(model, ViTModel) else model.vit
    pruned = {str(i): sorted(layer.attention.pruned_heads)
              for i, layer in enumerate(backbone.encoder.layer) if layer.attention.pruned_heads}
    if pruned:
        hf["pruned_heads"] = pruned  # transformers prunes these before loading the (smaller) weights
    hf["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    # safetensors wants contiguous, unshared CPU tensors; "format": "pt" is what transformers checks.
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    _readable_by_all(directory / SAFETENSORS_NAME)  # safetensors creates it 0600, like a temporary file
    (directory / CONFIG_NAME).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


def _readable_by_all(path: Path) -> None:
    """The mode ``open()`` would have given the file (0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def architecture_of(hf: dict[str, Any]) -> str:
    """The class of ours that reads an HF config.json: MAE and SimMIM as themselves (this project's
    exports of them too); a ViTModel or a classifier as our classifier."""
    if hf.get("model_type") == "vit_mae":
        return "ViTMAEForPreTraining"
    if "ViTForMaskedImageModeling" in (hf.get("architectures") or []):
        return "ViTForMaskedImageModeling"
    return "ViTForImageClassification"


def from_pretrained(directory: str | Path, *, num_labels: int | None = None, activation_checkpointing: str = "none",
                    architecture: str | None = None) -> nn.Module:
    """Load a transformers-format ViT directory into our ``architecture`` (a name of ARCHITECTURES;
    None: the one its config.json names, ``architecture_of``).

    For the classifier, a ViTModel checkpoint (no classifier) loads its backbone and keeps a freshly
    initialised classifier; so does a checkpoint whose label count differs from a given
    ``num_labels`` (fine-tuning on new classes). Any other missing, unexpected or mis-shaped key is
    an error; the pretraining models (MAE, SimMIM) must find every weight of theirs.
    """
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"architecture '{architecture}' is unknown; use one of {', '.join(ARCHITECTURES)}")
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory '{directory}' does not exist; pass a directory written by "
                         "save_pretrained (config.json + model.safetensors)")
    if not config_path.is_file():
        raise ValueError(f"'{config_path}' is missing; the directory must hold config.json from save_pretrained")
    try:
        hf = json.loads(config_path.read_text())
        architecture = architecture or architecture_of(hf)
        overrides: dict[str, Any] = {"activation_checkpointing": activation_checkpointing}
        if num_labels is not None:
            overrides["num_labels"] = num_labels
        cfg = config_from_hf(hf, architecture=architecture, **overrides)
    except (json.JSONDecodeError, ConfigError, TypeError) as error:
        raise ValueError(f"'{config_path}' is not a usable ViT config: {error}") from None

    model = ARCHITECTURES[architecture](cfg)
    pruned = {int(layer): heads for layer, heads in (hf.get("pruned_heads") or {}).items()}
    if pruned:
        model.prune_heads(pruned)
    state, weights_path = _read_weights(directory)
    if not any(key.startswith("vit.") for key in state):
        state = {f"vit.{key}": value for key, value in state.items()}  # a bare ViTModel's keys
    new_head = (architecture == "ViTForImageClassification" and num_labels is not None
                and num_labels != _hf_num_labels(hf))
    _load_checked(model, state, weights_path, keep_fresh_classifier=new_head)
    return model


def _read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    safetensors_path, index_path = directory / SAFETENSORS_NAME, directory / SAFETENSORS_INDEX_NAME
    torch_path = directory / TORCH_NAME
    if safetensors_path.is_file():
        return load_file(str(safetensors_path)), safetensors_path
    if index_path.is_file():  # sharded: {"weight_map": {key: file}}
        state: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index_path.read_text())["weight_map"].values())):
            state.update(load_file(str(directory / shard)))
        return state, index_path
    if torch_path.is_file():
        # weights_only: a .bin is a pickle, and an arbitrary pickle can run code on load
        return torch.load(torch_path, map_location="cpu", weights_only=True), torch_path
    raise ValueError(f"no weights in '{directory}': expected {SAFETENSORS_NAME} or {TORCH_NAME}; "
                     "write them with save_pretrained")


def _load_checked(model: nn.Module, state: dict[str, Tensor], path: Path, *, keep_fresh_classifier: bool) -> None:
    """Copy ``state`` into ``model``, allowing only the differences a backbone checkpoint implies."""
    expected = model.state_dict()
    skipped = [key for key in state if key.startswith(NOT_ENCODER_KEYS) and key not in expected]
    state = {key: value for key, value in state.items() if key not in skipped}
    has_classifier = any(key.startswith("classifier.") for key in state)
    if keep_fresh_classifier or not has_classifier:
        # new head: keep the random init (e.g. fine-tuning a backbone on another label set)
        state = {key: value for key, value in state.items() if not key.startswith("classifier.")}
        fresh = [key for key in expected if key.startswith("classifier.")]
    else:
        fresh = []
    missing = sorted(set(expected) - set(state) - set(fresh))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
                        for key in set(state) & set(expected) if state[key].shape != expected[key].shape)
    if missing or unexpected or mis_shaped:
        raise ValueError(f"'{path}' does not match the model built from its config.json: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, mis-shaped {mis_shaped[:5]}; "
                         "check that config.json and the weights come from the same save_pretrained")
    model.load_state_dict(state, strict=False)
    if skipped or fresh:
        log.info("loaded %s; skipped %d unused backbone tensors; newly initialised: %s", path, len(skipped), fresh)
