"""The model section: the ViT's shape with HuggingFace ``ViTConfig``'s names, and named sizes."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError, require

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
# With no size named, the shape is HuggingFace ViTConfig's default: ViT-B/16 at 224 pixels.
DEFAULT_SIZE = "B/16"
DEFAULT_IMAGE_SIZE = 224

# Activations HuggingFace's ViT accepts through ACT2FN (the names a config.json may carry).
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "gelu_python",
               "relu", "relu6", "silu", "swish", "tanh", "sigmoid", "mish", "leaky_relu", "linear",
               "gelu_accurate", "gelu_10", "relu2", "laplace")


@dataclass
class ModelConfig:
    """The ViT's shape, with HuggingFace ``ViTConfig``'s field names and defaults (ViT-B/16).

    The shape fields default to None, meaning "from ``size``" (ViT-B/16 when no size is named):
    a field given beside a size always wins, even one equal to a B/16 value, and rebuilding a
    resolved config (``dataclasses.replace``, a checkpoint's record) leaves it as it is.
    """

    size: str | None = None  # a name from MODEL_SIZES; fields given beside it win
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    # Stochastic depth (timm's and DeiT's drop_path_rate): each residual branch of layer i is dropped
    # per sample with probability drop_path_rate * i / (layers - 1) in training. No parameters, so
    # checkpoints and HF exports do not change; HF's ViTConfig has no such field.
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | list[int] | None = None  # an int, or [height, width]
    patch_size: int | list[int] | None = None  # an int, or [height, width]
    num_channels: int = 3
    qkv_bias: bool = True
    # SimMIM's PixelShuffle factor; None: the patch size, as HF's configs pair them (16 with 16)
    encoder_stride: int | None = None
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    num_labels: int = 1000
    # Activation checkpointing per ViTLayer: "none", "all", or "every-K" (layers 0, K, 2K, ...).
    activation_checkpointing: str = "none"
    # Masked-image pretraining (train.objective mae or simmim); classification ignores these.
    # MAE, with transformers ViTMAEConfig's names and defaults:
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048
    mask_ratio: float = 0.75  # fraction of the patches MAE removes before the encoder
    norm_pix_loss: bool = False  # MAE's target: each patch normalised by its own mean and variance
    # SimMIM, the paper's mask generator (transformers' ViTConfig has no such fields). Its ratio is a
    # field of its own: MAE's mask_ratio keeps HF's name and default, and the two objectives'
    # defaults (0.75, 0.6) differ, so one field would need a default that depends on train.objective.
    # Masked blocks are mask_patch_size pixels square. None: the paper's 32 where the image holds at
    # least 2x2 such blocks of whole patches, else the largest multiple of the patch size that does.
    mask_patch_size: int | None = None
    simmim_mask_ratio: float = 0.6

    def __post_init__(self) -> None:
        # The one place a named size becomes fields: it fills only the fields nobody gave.
        require(self.size is None or self.size in MODEL_SIZES,
                f"model.size '{self.size}' is unknown; choose one of {', '.join(MODEL_SIZES)}")
        sized = {"image_size": DEFAULT_IMAGE_SIZE, **MODEL_SIZES[self.size or DEFAULT_SIZE]}
        for key, value in sized.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        require(self.hidden_size > 0, f"model.hidden_size must be positive, got {self.hidden_size}")
        require(self.num_hidden_layers > 0,
                f"model.num_hidden_layers must be positive, got {self.num_hidden_layers}")
        require(self.num_attention_heads > 0,
                f"model.num_attention_heads must be positive, got {self.num_attention_heads}")
        require(self.hidden_size % self.num_attention_heads == 0,
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_attention_heads "
                f"({self.num_attention_heads}); pick sizes such as 768/12 or 384/6")
        require(self.intermediate_size > 0,
                f"model.intermediate_size must be positive, got {self.intermediate_size}")
        require(self.hidden_act in HIDDEN_ACTS,
                f"model.hidden_act '{self.hidden_act}' is unknown; allowed: {', '.join(HIDDEN_ACTS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"model.{name} must be in [0, 1), got {value}")
        require(self.layer_norm_eps > 0, f"model.layer_norm_eps must be positive, got {self.layer_norm_eps}")
        require(self.num_channels > 0, f"model.num_channels must be positive, got {self.num_channels}")
        require(self.num_labels > 0, f"model.num_labels must be positive, got {self.num_labels}")
        image_hw, patch_hw = self.image_hw, self.patch_hw
        require(all(v > 0 for v in image_hw + patch_hw),
                f"model.image_size {self.image_size} and model.patch_size {self.patch_size} must be positive")
        require(image_hw[0] % patch_hw[0] == 0 and image_hw[1] % patch_hw[1] == 0,
                f"model.image_size {self.image_size} must be divisible by model.patch_size {self.patch_size}")
        self.checkpoint_layer_ids()  # validates activation_checkpointing
        if self.encoder_stride is None:
            self.encoder_stride = patch_hw[0]
        if self.mask_patch_size is None:
            self.mask_patch_size = _default_mask_patch(image_hw, patch_hw[0])
        for name in ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
                     "decoder_intermediate_size", "mask_patch_size"):
            require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        require(self.decoder_hidden_size % self.decoder_num_attention_heads == 0,
                f"model.decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by "
                f"model.decoder_num_attention_heads ({self.decoder_num_attention_heads}); HF's default is 512/16")
        require(0.0 <= self.mask_ratio < 1.0, f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        require(0.0 <= self.simmim_mask_ratio <= 1.0,
                f"model.simmim_mask_ratio must be in [0, 1], got {self.simmim_mask_ratio}")

    def check_objective(self, objective: str) -> None:
        """The checks that hold for one training objective only (the caller knows train.objective):
        MAE's sin-cos position tables need widths divisible by 4; SimMIM rebuilds the pixels with
        PixelShuffle(encoder_stride) and masks whole mask_patch_size blocks of patches."""
        if objective == "mae":
            for name in ("hidden_size", "decoder_hidden_size"):
                require(getattr(self, name) % 4 == 0, f"model.{name} must be a multiple of 4 for MAE's sin-cos "
                                                      f"position table, got {getattr(self, name)}")
        elif objective == "simmim":
            (patch_h, patch_w), (height, width), block = self.patch_hw, self.image_hw, self.mask_patch_size
            require(patch_h == patch_w == self.encoder_stride,
                    f"model.patch_size {self.patch_size} must be square and equal to model.encoder_stride "
                    f"({self.encoder_stride}) for SimMIM, whose decoder is PixelShuffle(encoder_stride)")
            require(height % block == 0 and width % block == 0,
                    f"model.image_size {self.image_size} must be divisible by model.mask_patch_size ({block})")
            require(block % patch_h == 0,
                    f"model.mask_patch_size ({block}) must be a multiple of model.patch_size ({patch_h})")
            blocks = (height // block) * (width // block)
            require(blocks >= 2,
                    f"model.mask_patch_size ({block}) leaves {blocks} mask block in a {height}x{width} image: SimMIM "
                    f"would mask all of it, whatever model.simmim_mask_ratio; use a smaller block, e.g. "
                    f"model.mask_patch_size={_default_mask_patch((height, width), patch_h)}, or leave it unset")

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
    require(isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value),
            f"{key} must be an integer or a list [height, width], got {value!r}")
    return int(value[0]), int(value[1])


def _default_mask_patch(image_hw: tuple[int, int], patch: int, largest: int = 32) -> int:
    """SimMIM's mask block: the paper's 32 px (6x6 blocks of a 192 px image) where the image holds
    at least 2x2 blocks, else the largest multiple of the patch size that divides the image that
    often; the patch size itself where none does (a one-patch image has nothing to mask)."""
    for block in range(largest // patch * patch, 0, -patch):
        if all(side % block == 0 and side // block >= 2 for side in image_hw):
            return block
    return patch
