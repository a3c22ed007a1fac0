"""The data, optim, train and checkpoint sections, and the root :class:`Config` that holds them."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import require
from .model import ModelConfig

# Training augmentations (pipeline/data/transforms.py builds each): "rrc" RandomResizedCrop,
# "shift" resize + random shift, "none" resize only.
AUGMENTS = ("rrc", "shift", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
# Training objectives (pipeline/tasks): supervised classification, or masked-image pretraining.
OBJECTIVES = ("classification", "mae", "simmim")
# Features a k-NN probe compares: the final CLS token, or the mean of the patch tokens.
PROBE_FEATURES = ("cls", "mean")


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
        require(self.batch_size > 0, f"data.batch_size must be positive, got {self.batch_size}")
        require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        require(self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        require(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")
        require(self.augment in AUGMENTS,
                f"data.augment '{self.augment}' is unknown; use one of {', '.join(AUGMENTS)}")
        require(self.shift_pixels >= 0, f"data.shift_pixels must be >= 0, got {self.shift_pixels}")
        require(0 < self.crop_pct <= 1, f"data.crop_pct must be in (0, 1], got {self.crop_pct}")
        require(len(self.mean) >= 1 and len(self.mean) == len(self.std),
                f"data.mean and data.std must have the same length (1 or the channel count), "
                f"got {len(self.mean)} and {len(self.std)}")
        require(all(s > 0 for s in self.std), f"data.std values must be positive, got {self.std}")
        require(0.0 <= self.max_bad_fraction <= 1.0,
                f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        require(self.eval_batch_size is None or self.eval_batch_size > 0,
                f"data.eval_batch_size must be positive, got {self.eval_batch_size}")
        require(bool(self.train_shards), "data.train_shards is empty; give a path or brace pattern of .tar shards")


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
        require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.schedule in ("cosine", "constant"),
                f"optim.schedule '{self.schedule}' is unknown; use 'cosine' or 'constant'")
        require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")



@dataclass
class TrainConfig:
    """The step loop."""

    output_dir: str = "runs/default"
    objective: str = "classification"  # "classification", "mae" or "simmim" (pipeline/tasks)
    # A pretrained encoder to start from (fine-tuning): a run directory or checkpoints/step-N of any
    # objective, or an HF directory. Only the encoder's weights are loaded; heads start fresh.
    init_from: str | None = None
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
    # An fp32 exponential moving average of the weights (timm's ModelEmaV3; DeiT uses 0.99996); 0 is off.
    # ema_warmup: timm's warmup, decay 1 - (1 + step)^(-2/3) until it reaches ema_decay.
    ema_decay: float = 0.0
    ema_warmup: bool = False

    def __post_init__(self) -> None:
        require(self.max_steps > 0, f"train.max_steps must be positive, got {self.max_steps}")
        require(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        require(self.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(self.precision in PRECISIONS,
                f"train.precision '{self.precision}' is unknown; use one of {', '.join(PRECISIONS)}")
        require(self.grad_accum_steps > 0,
                f"train.grad_accum_steps must be positive, got {self.grad_accum_steps}")
        require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        require(self.log_every > 0, f"train.log_every must be positive, got {self.log_every}")
        require(0 <= self.label_smoothing < 1,
                f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        require(self.max_nonfinite_steps >= 0,
                f"train.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        require(bool(self.output_dir), "train.output_dir is empty; give a directory for the run")
        require(self.objective in OBJECTIVES,
                f"train.objective '{self.objective}' is unknown; use one of {', '.join(OBJECTIVES)}")
        require(self.init_from is None or bool(self.init_from),
                "train.init_from is empty; give a checkpoint or HF directory, or leave it unset (null)")
        require(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1) (0 is off), got {self.ema_decay}")
        require(not self.ema_warmup or self.ema_decay > 0,
                "train.ema_warmup=true needs train.ema_decay > 0 (the decay the warmup rises to)")
        # ZeRO-0 fp16 keeps its fp32 master in DeepSpeed's FP16_Optimizer, whose flat groups the EMA does not follow.
        require(not (self.ema_decay and self.zero_stage == 0 and self.precision == "fp16"),
                "train.ema_decay with train.precision=fp16 needs train.zero_stage >= 1 (or use bf16/fp32 at ZeRO-0)")


@dataclass
class CheckpointConfig:
    """When to save and where to resume from."""

    every_steps: int = 0  # 0 saves only at the end (and on a stop signal)
    keep_last: int = 3
    resume: str = "auto"  # "auto": newest complete checkpoint if any; "none": fresh; or a path
    overwrite: bool = False  # with resume=none, allow starting over an existing run

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        require(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        require(bool(self.resume), "checkpoint.resume is empty; use 'auto', 'none' or a checkpoint path")


@dataclass
class ProbeConfig:
    """The representation probe of masked-image pretraining (mae, simmim): at each evaluation, when
    the shards carry labels, k-NN top-1 of validation features against a bank of training features."""

    knn: bool = True
    k: int = 20
    # Each of the k nearest neighbours (cosine similarity s) votes for its class with exp(s / T),
    # DINO's weighted vote; the class with the largest sum wins.
    temperature: float = 0.07
    features: str = "cls"  # "cls": the final CLS token; "mean": the mean of the patch tokens
    # The bank: the first bank_size samples of data.train_shards in shard order, eval transform.
    bank_size: int = 10000

    def __post_init__(self) -> None:
        require(self.k > 0, f"probe.k must be positive, got {self.k}")
        require(self.temperature > 0, f"probe.temperature must be positive, got {self.temperature}")
        require(self.features in PROBE_FEATURES,
                f"probe.features '{self.features}' is unknown; use one of {', '.join(PROBE_FEATURES)}")
        require(self.bank_size > 0, f"probe.bank_size must be positive, got {self.bank_size}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # native DeepSpeed keys, passed through

    def __post_init__(self) -> None:
        self.model.check_objective(self.train.objective)  # what one objective needs of the model
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, sections: tuple[str, ...] = ("model",)) -> str:
        """A short digest of the given sections, stored with checkpoints to detect mismatches."""
        data = {name: dataclasses.asdict(getattr(self, name)) for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
