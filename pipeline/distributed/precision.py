"""The one place that decides precision: what the device can train in, the engine's weight dtype,
the dtype the inputs are cast to, and whether the forward runs under autocast.

``train.precision`` is the user's choice; how it maps onto DeepSpeed differs by ZeRO stage:
at ZeRO 1-3 ``bf16``/``fp16`` are DeepSpeed's modes (16-bit weights, fp32 master weights in the
optimizer). At ZeRO-0 DeepSpeed's bf16 would keep no fp32 master copy (visibly worse losses),
so there we keep fp32 weights and run the forward under ``torch.autocast(bf16)``.
"""
from __future__ import annotations

import contextlib

import torch

from pipeline.config import ConfigError, TrainConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot train in, before any process group exists."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); "
                          "use train.precision=bf16 or fp32 here")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16 is not supported by this GPU; use train.precision=fp16 or fp32")


def uses_autocast(train: TrainConfig) -> bool:
    """bf16 at ZeRO-0: fp32 weights, forward under autocast (see the module docstring)."""
    return train.precision == "bf16" and train.zero_stage == 0


def engine_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype of the engine's weights, which is also the dtype the inputs are cast to."""
    return torch.float32 if uses_autocast(train) else _DTYPES[train.precision]


def matmul_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype the matrix multiplies run in (for the device's peak FLOP/s in MFU)."""
    return _DTYPES[train.precision]


def autocast_context(train: TrainConfig, device: torch.device):
    if uses_autocast(train):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def deepspeed_precision(train: TrainConfig) -> dict:
    """The ``bf16`` / ``fp16`` sections of the DeepSpeed config that follow from the choice above."""
    return {"bf16": {"enabled": engine_dtype(train) == torch.bfloat16},
            "fp16": {"enabled": train.precision == "fp16"}}
