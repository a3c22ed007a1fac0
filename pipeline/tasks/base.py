"""The task seam: what an objective (classification, masked-image pretraining, ...) decides.

The trainer, the evaluation loop, the benchmarks and the checkpoint code call a :class:`Task`
and know nothing of labels or pixels-as-targets. A task owns:

- the model it trains (the ViT with its head) -- ``build_model``;
- its training loss -- ``loss``;
- its evaluation: per-batch sums on the device, reduced over ranks by the caller, then turned
  into metrics -- ``eval_sums`` / ``eval_metrics``;
- the sample keys it needs from the shards besides the image -- ``sample_keys``;
- the model fields a checkpoint must match to be resumed -- ``shape_fields``;
- the analytic FLOPs of a training step, the numerator of MFU -- ``flops``;
- optionally, the encoder features a representation probe compares -- ``features``.

Batches reach a task on the device: ``batch["image"]`` normalized and in the engine's dtype,
plus the tensors its ``sample_keys`` became (``"label"`` for ``cls``), and ``batch["valid"]``
in evaluation (False marks padding).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig

# Model fields that change the weights' shapes whatever the task: a checkpoint saved with other
# values cannot be loaded. Tasks add their own (the classifier's num_labels, a decoder's width).
ENCODER_SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                        "image_size", "patch_size", "num_channels", "qkv_bias", "pooler_output_size")


class Task(ABC):
    name: str
    sample_keys: tuple[str, ...] = ()
    shape_fields: tuple[str, ...] = ENCODER_SHAPE_FIELDS
    eval_names: tuple[str, ...] = ()
    has_features = False  # ``features`` gives the probe's encoder features

    @abstractmethod
    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        """The randomly initialised model this task trains."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        """The training loss of one micro-batch: an fp32 scalar on the device, never read on the host."""

    @abstractmethod
    def eval_sums(self, model: nn.Module, batch: dict) -> Tensor:
        """float64 sums over the batch's valid samples, one per ``eval_names``, on the device."""

    @abstractmethod
    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from the sums of every batch on every rank."""

    @abstractmethod
    def flops(self, model_cfg: ModelConfig, batch_size: int) -> float:
        """Analytic FLOPs of a training step (forward and backward) on ``batch_size`` images."""

    def start_eval(self, device: torch.device) -> None:
        """Called before each evaluation pass (a task that draws random masks reseeds its own
        evaluation generator here: the same masks at every evaluation, training's RNG untouched)."""

    def features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """(CLS token, mean of the patch tokens), each (batch, hidden), of the encoder on the whole
        image: what the k-NN probe compares (pipeline/probe.py). None: this task has no probe."""
        return None
