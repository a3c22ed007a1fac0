"""Typed configuration: YAML file, then dotted command-line overrides.

One dataclass per section. Every value is checked in ``__post_init__`` and a mistake is
reported as a one-line :class:`ConfigError` that names the key and what is allowed.
Standard library and PyYAML only: everything else imports this module, never the reverse.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user's configuration mistake; the message is one line naming the key and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# The ViT paper's and timm's sizes, keyed by the names users type. "tiny" is the CPU demo size.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                 image_size=16, patch_size=4),
    "Ti/16": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                  patch_size=16),
    "S/16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                 patch_size=16),
    "B/16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 patch_size=16),
    "L/16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 patch_size=16),
    "H/14": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                 patch_size=14),
}

# Activations HuggingFace's ViT accepts through ACT2FN (the names a config.json may carry).
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "gelu_python",
               "relu", "relu6", "silu", "swish", "tanh", "sigmoid", "mish", "leaky_relu", "linear",
               "gelu_accurate", "gelu_10", "relu2", "laplace")


@dataclass
class ModelConfig:
    """The ViT's shape, with HuggingFace ``ViTConfig``'s field names and defaults (ViT-B/16)."""

    size: str | None = None  # a name from MODEL_SIZES; explicit fields given beside it win
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | list[int] = 224  # an int, or [height, width]
    patch_size: int | list[int] = 16  # an int, or [height, width]
    num_channels: int = 3
    qkv_bias: bool = True
    encoder_stride: int = 16
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    num_labels: int = 1000
    # Activation checkpointing per ViTLayer: "none", "all", or "every-K" (layers 0, K, 2K, ...).
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        if self.size is not None:  # built directly: the size fills the fields left at their defaults
            _require(self.size in MODEL_SIZES,
                     f"model.size '{self.size}' is unknown; choose one of {', '.join(MODEL_SIZES)}")
            for key, value in MODEL_SIZES[self.size].items():
                if getattr(self, key) == _MODEL_FIELD_DEFAULTS[key]:
                    setattr(self, key, value)
        _require(self.hidden_size > 0, f"model.hidden_size must be positive, got {self.hidden_size}")
        _require(self.num_hidden_layers > 0,
                 f"model.num_hidden_layers must be positive, got {self.num_hidden_layers}")
        _require(self.num_attention_heads > 0,
                 f"model.num_attention_heads must be positive, got {self.num_attention_heads}")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_attention_heads "
                 f"({self.num_attention_heads}); pick sizes such as 768/12 or 384/6")
        _require(self.intermediate_size > 0,
                 f"model.intermediate_size must be positive, got {self.intermediate_size}")
        _require(self.hidden_act in HIDDEN_ACTS,
                 f"model.hidden_act '{self.hidden_act}' is unknown; allowed: {', '.join(HIDDEN_ACTS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"model.{name} must be in [0, 1), got {value}")
        _require(self.layer_norm_eps > 0, f"model.layer_norm_eps must be positive, got {self.layer_norm_eps}")
        _require(self.num_channels > 0, f"model.num_channels must be positive, got {self.num_channels}")
        _require(self.num_labels > 0, f"model.num_labels must be positive, got {self.num_labels}")
        image_hw, patch_hw = self.image_hw, self.patch_hw
        _require(all(v > 0 for v in image_hw + patch_hw),
                 f"model.image_size {self.image_size} and model.patch_size {self.patch_size} must be positive")
        _require(image_hw[0] % patch_hw[0] == 0 and image_hw[1] % patch_hw[1] == 0,
                 f"model.image_size {self.image_size} must be divisible by model.patch_size {self.patch_size}")
        self.checkpoint_layer_ids()  # validates activation_checkpointing

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair("model.image_size", self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair("model.patch_size", self.patch_size)

    @property
    def num_patches(self) -> int:
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        return (h // ph) * (w // pw)

    def checkpoint_layer_ids(self) -> set[int]:
        """Indices of the ViTLayers whose activations are recomputed in the backward pass."""
        spec = self.activation_checkpointing
        if spec == "none":
            return set()
        if spec == "all":
            return set(range(self.num_hidden_layers))
        if spec.startswith("every-") and spec[6:].isdigit() and int(spec[6:]) > 0:
            return set(range(0, self.num_hidden_layers, int(spec[6:])))
        raise ConfigError(f"model.activation_checkpointing '{spec}' is not allowed; "
                          "use 'none', 'all' or 'every-K' with K a positive integer")


def _pair(key: str, value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    _require(isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value),
             f"{key} must be an integer or a list [height, width], got {value!r}")
    return int(value[0]), int(value[1])


_MODEL_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


@dataclass
class DataConfig:
    """Where the shards are and how they become batches."""

    train_shards: str | list[str] = "data/digits/train-{000000..000003}.tar"
    val_shards: str | list[str] | None = None
    batch_size: int = 32  # per-rank micro-batch
    num_workers: int = 2
    ledger: bool = False  # write <output_dir>/ledger/rank<R>.jsonl: the sample keys of every step
    manifest: str | None = None  # manifest.json path/URL when it does not sit beside the shards
    shuffle_buffer: int = 1000  # samples held by each worker's seeded shuffle buffer
    augment: str = "rrc"  # "rrc": RandomResizedCrop; "shift": resize + random shift; "none": resize only
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    shift_pixels: int = 1  # largest shift (pixels at the model's resolution) for augment=shift
    hflip: bool = True  # random horizontal flip in training (off for digits: it changes meaning)
    crop_pct: float = 0.875  # evaluation: resize to image_size / crop_pct, then center crop
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples failed to decode
    eval_batch_size: int | None = None  # defaults to batch_size

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"data.batch_size must be positive, got {self.batch_size}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        _require(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                 f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")
        _require(self.augment in ("rrc", "shift", "none"),
                 f"data.augment '{self.augment}' is unknown; use 'rrc', 'shift' or 'none'")
        _require(self.shift_pixels >= 0, f"data.shift_pixels must be >= 0, got {self.shift_pixels}")
        _require(0 < self.crop_pct <= 1, f"data.crop_pct must be in (0, 1], got {self.crop_pct}")
        _require(len(self.mean) >= 1 and len(self.mean) == len(self.std),
                 f"data.mean and data.std must have the same length (1 or the channel count), "
                 f"got {len(self.mean)} and {len(self.std)}")
        _require(all(s > 0 for s in self.std), f"data.std values must be positive, got {self.std}")
        _require(0.0 <= self.max_bad_fraction <= 1.0,
                 f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        _require(self.eval_batch_size is None or self.eval_batch_size > 0,
                 f"data.eval_batch_size must be positive, got {self.eval_batch_size}")
        _require(bool(self.train_shards), "data.train_shards is empty; give a path or brace pattern of .tar shards")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" or "constant" (after warmup)
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.schedule in ("cosine", "constant"),
                 f"optim.schedule '{self.schedule}' is unknown; use 'cosine' or 'constant'")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """The step loop."""

    output_dir: str = "runs/default"
    max_steps: int = 1000
    seed: int = 0
    zero_stage: int = 2
    precision: str = "bf16"
    grad_accum_steps: int = 1
    eval_every: int = 0  # steps between evaluations; 0 evaluates only at the end
    log_every: int = 10  # steps between metrics rows; 1 logs every step
    label_smoothing: float = 0.1
    max_nonfinite_steps: int = 0  # non-finite losses tolerated (step skipped) before the run stops
    compile: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _require(self.max_steps > 0, f"train.max_steps must be positive, got {self.max_steps}")
        _require(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        _require(self.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.precision in PRECISIONS,
                 f"train.precision '{self.precision}' is unknown; use one of {', '.join(PRECISIONS)}")
        _require(self.grad_accum_steps > 0,
                 f"train.grad_accum_steps must be positive, got {self.grad_accum_steps}")
        _require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        _require(self.log_every > 0, f"train.log_every must be positive, got {self.log_every}")
        _require(0 <= self.label_smoothing < 1,
                 f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _require(self.max_nonfinite_steps >= 0,
                 f"train.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        _require(bool(self.output_dir), "train.output_dir is empty; give a directory for the run")


@dataclass
class CheckpointConfig:
    """When to save and where to resume from."""

    every_steps: int = 0  # 0 saves only at the end (and on a stop signal)
    keep_last: int = 3
    resume: str = "auto"  # "auto": newest complete checkpoint if any; "none": fresh; or a path
    overwrite: bool = False  # with resume=none, allow starting over an existing run

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _require(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        _require(bool(self.resume), "checkpoint.resume is empty; use 'auto', 'none' or a checkpoint path")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # native DeepSpeed keys, passed through

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, sections: tuple[str, ...] = ("model",)) -> str:
        """A short digest of the given sections, stored with checkpoints to detect mismatches."""
        data = {name: dataclasses.asdict(getattr(self, name)) for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise a ConfigError naming ``key``."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{key} has the wrong type: got {value!r}, expected {_type_name(annotation)}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} has the wrong type: got {value!r}, expected {_type_name(annotation)}")
        return [_check_type(key, v, item_type) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} has the wrong type: got {value!r}, expected {_type_name(annotation)}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _build_section(name: str, cls: type, raw: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key '{name}.{key}'; known keys of '{name}': {', '.join(sorted(known))}")
    size = raw.get("size") if cls is ModelConfig else None
    if size is not None:
        _require(size in MODEL_SIZES, f"model.size '{size}' is unknown; choose one of {', '.join(MODEL_SIZES)}")
        # From a file every given field is explicit and wins, even one equal to a B/16 default.
        raw = {**MODEL_SIZES[size], **raw, "size": None}
    values = {key: _check_type(f"{name}.{key}", value, hints[key]) for key, value in raw.items()}
    section = cls(**values)
    if size is not None:
        section.size = size  # recorded after __post_init__, which would fill default-valued fields
    return section


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dictionaries (unknown keys are errors)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section '{name}'; known sections: {', '.join(SECTIONS)}")
    sections: dict[str, Any] = {}
    for name, spec in SECTIONS.items():
        section_raw = raw.get(name) or {}
        if not isinstance(section_raw, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {section_raw!r}")
        if name == "deepspeed":
            sections[name] = dict(section_raw)
        else:
            sections[name] = _build_section(name, spec.default_factory, dict(section_raw))
    return Config(**sections)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=10`` -> (["train", "max_steps"], 10); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.max_steps=10")
    dotted, _, value_text = text.partition("=")
    path = dotted.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override '{text}' must name section.key, e.g. train.max_steps=10")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None), then apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    return config_from_dict(apply_overrides(raw, list(overrides or [])))


def dump_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
