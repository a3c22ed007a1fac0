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
# data.mixup_mode, as timm's Mixup: one lambda per batch, per pair of samples, or per sample.
MIXUP_MODES = ("batch", "pair", "elem")
# data.remode, as timm's RandomErasing: fill with 0, a normal colour per box, or normal noise per pixel.
ERASE_MODES = ("const", "rand", "pixel")
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
    # On a resume on another world size: set train.grad_accum_steps so that the global batch stays
    # the checkpoint's (refused where data.batch_size x world size does not divide it).
    keep_global_batch: bool = False
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
    # Augmentations of the DeiT/MAE recipes, named and meant as timm's flags; all off by default.
    auto_augment: str | None = None  # timm spec, e.g. "rand-m9-mstd0.5-inc1" (RandAugment), in the workers
    mixup: float = 0.0  # mixup Beta alpha (timm --mixup); 0 = off. On the device, classification only
    cutmix: float = 0.0  # cutmix Beta alpha (timm --cutmix); 0 = off
    mixup_prob: float = 1.0  # probability of mixing a batch (or sample) at all
    mixup_switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup
    mixup_mode: str = "batch"  # "batch", "pair" or "elem": how often lambda is drawn
    reprob: float = 0.0  # random erasing probability per sample (timm --reprob); 0 = off. On the device
    remode: str = "pixel"  # "const", "rand" or "pixel" fill of an erased box
    recount: int = 1  # erased boxes per sample: 1..recount, uniform
    aug_repeats: int = 1  # repeated augmentation (DeiT's RASampler): copies of each sample; 1 = off
    # Remote shards (s3://, http(s)://): a failed read is retried from its byte; giving up (exit 75)
    # takes io_retries failures in a row or io_timeout_s since the first of them.
    io_retries: int = 10
    io_timeout_s: float = 120.0
    io_prefetch: bool = True  # open a worker's next remote shard (or range) while it reads the current one
    cache_dir: str | None = None  # node-local cache of whole remote shards (off: read by range every epoch)
    cache_limit_gb: float = 0.0  # evict the least recently used cached shards beyond this; 0: no limit

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
        self._check_recipe_augmentations()
        require(bool(self.train_shards), "data.train_shards is empty; give a path or brace pattern of .tar shards")
        require(self.io_retries >= 0, f"data.io_retries must be >= 0, got {self.io_retries}")
        require(self.io_timeout_s > 0, f"data.io_timeout_s must be positive (seconds), got {self.io_timeout_s}")
        require(self.cache_limit_gb >= 0, f"data.cache_limit_gb must be >= 0 (0: no limit), got {self.cache_limit_gb}")

    @property
    def mixes(self) -> bool:
        """Mixup or cutmix is on: training targets are soft (label smoothing folded in)."""
        return self.mixup > 0 or self.cutmix > 0

    def _check_recipe_augmentations(self) -> None:
        spec = self.auto_augment
        require(spec is None or (isinstance(spec, str) and spec.startswith("rand") and
                                 all(part[:1].isalpha() for part in spec.split("-")[1:])),
                f"data.auto_augment {spec!r} is not a RandAugment spec; use timm's form, e.g. "
                "rand-m9-mstd0.5-inc1, or null")
        for name in ("mixup", "cutmix"):
            require(getattr(self, name) >= 0, f"data.{name} must be >= 0 (a Beta alpha; 0 = off), "
                                              f"got {getattr(self, name)}")
        for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"data.{name} must be in [0, 1], got {value}")
        require(self.mixup_mode in MIXUP_MODES,
                f"data.mixup_mode '{self.mixup_mode}' is unknown; use one of {', '.join(MIXUP_MODES)}")
        require(self.remode in ERASE_MODES,
                f"data.remode '{self.remode}' is unknown; use one of {', '.join(ERASE_MODES)}")
        require(self.recount >= 1, f"data.recount must be >= 1, got {self.recount}")
        require(self.aug_repeats >= 1, f"data.aug_repeats must be >= 1 (1 = off), got {self.aug_repeats}")
        require(not self.mixes or self.batch_size % 2 == 0,
                f"data.batch_size={self.batch_size} is odd; mixup/cutmix pair each sample with the batch's "
                "mirror image: use an even data.batch_size, or data.mixup=0 and data.cutmix=0")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    # The peak LR. Unset (null), it is 1e-3, or blr x global batch / blr_batch when optim.blr is set.
    lr: float | None = None
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" or "constant" (after warmup)
    grad_clip: float = 1.0  # 0 disables clipping
    # MAE's layer-wise LR decay (its --layer_decay; 0.65 for B/16 fine-tuning, 0.75 for L/16): the LR of
    # encoder layer i is scaled by layer_decay ** (layers - i), the embeddings' by layer_decay ** (layers + 1),
    # the final norm and head keep the LR. null: off (one LR for all).
    layer_decay: float | None = None
    # The base LR of MAE and DeiT (--blr): lr = blr x global batch / blr_batch, global batch =
    # data.batch_size x train.grad_accum_steps x world size. blr_batch: 256 for MAE, 512 for DeiT.
    blr: float | None = None
    blr_batch: int = 256
    # Warmup in epochs (MAE's --warmup_epochs), converted to steps like train.epochs; instead of warmup_steps.
    warmup_epochs: float | None = None

    def __post_init__(self) -> None:
        require(self.lr is None or self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        require(self.blr is None or self.blr > 0, f"optim.blr must be positive (or null: off), got {self.blr}")
        require(self.blr_batch > 0, f"optim.blr_batch must be positive, got {self.blr_batch}")
        if self.lr is None and self.blr is None:
            self.lr = 1e-3
        if self.lr is not None:  # with blr alone, the LR (and this check) waits for the world size
            require(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        require(self.min_lr >= 0, f"optim.min_lr must be >= 0, got {self.min_lr}")
        require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.warmup_epochs is None or self.warmup_epochs >= 0,
                f"optim.warmup_epochs must be >= 0 (or null), got {self.warmup_epochs}")
        require(self.schedule in ("cosine", "constant"),
                f"optim.schedule '{self.schedule}' is unknown; use 'cosine' or 'constant'")
        require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        require(self.layer_decay is None or 0 < self.layer_decay <= 1,
                f"optim.layer_decay must be in (0, 1] (MAE uses 0.65-0.75), or null to turn it off; "
                f"got {self.layer_decay}")


@dataclass
class TrainConfig:
    """The step loop."""

    output_dir: str = "runs/default"
    objective: str = "classification"  # "classification", "mae" or "simmim" (pipeline/tasks)
    # A pretrained encoder to start from (fine-tuning): a run directory or checkpoints/step-N of any
    # objective, or an HF directory. Only the encoder's weights are loaded; heads start fresh.
    init_from: str | None = None
    # The run's length: max_steps optimizer steps, or epochs over data.train_shards (DeiT's and MAE's
    # --epochs), converted to steps from the manifest's counts, the world size and the batch. One of
    # the two; unset, 1000 steps. The resolved run's config.yaml holds both, in agreement.
    max_steps: int | None = None
    epochs: int | None = None
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
        require(self.epochs is None or self.epochs > 0, f"train.epochs must be positive (or null), got {self.epochs}")
        if self.max_steps is None and self.epochs is None:
            self.max_steps = 1000
        require(self.max_steps is None or self.max_steps > 0, f"train.max_steps must be positive, got {self.max_steps}")
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
    # checkpoint.async: true: a save copies the state into host memory and training goes on while
    # a background thread writes it; COMPLETE comes once every rank's files are durable. The key is
    # `async` (a Python keyword: the field takes PEP 8's trailing underscore, loading.py maps it).
    async_: bool = False

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
        require(self.train.objective == "classification" or not (self.data.mixes or self.data.reprob),
                f"data.mixup/cutmix/reprob apply to labelled classification only, not train.objective="
                f"{self.train.objective}; set them to 0")
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, sections: tuple[str, ...] = ("model",)) -> str:
        """A short digest of the given sections, stored with checkpoints to detect mismatches."""
        data = {name: dataclasses.asdict(getattr(self, name)) for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
