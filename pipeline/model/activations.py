"""Activation functions by the names a HuggingFace ViT config.json may carry.

Written out here (transformers is not imported) to give the same numbers as transformers'
``ACT2FN`` for every name in ``pipeline.config.HIDDEN_ACTS``; the formulas keep HF's order of
operations so fp32 results agree to the last bits.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _gelu_tanh_formula(x: Tensor) -> Tensor:  # "gelu_new" / "gelu_accurate"
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_python(x: Tensor) -> Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _laplace(x: Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> Tensor:
    return 0.5 * (1.0 + torch.erf((x - mu).div(sigma * math.sqrt(2.0))))


def _gelu_pytorch_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_10(x: Tensor) -> Tensor:
    return torch.clip(F.gelu(x), -10.0, 10.0)


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu2(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


def _leaky_relu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.01)  # nn.LeakyReLU's default slope


def _identity(x: Tensor) -> Tensor:
    return x


# Named functions, not lambdas, so a model stays picklable.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh_formula,
    "gelu_accurate": _gelu_tanh_formula,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": _gelu_pytorch_tanh,
    "gelu_python": _gelu_python,
    "gelu_10": _gelu_10,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "relu6": F.relu6,
    "relu2": _relu2,
    "leaky_relu": _leaky_relu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": _identity,
    "laplace": _laplace,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation '{name}' is unknown; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]
