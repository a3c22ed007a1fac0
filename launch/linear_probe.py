"""Probes of a frozen encoder for the MAE demo: k-NN and linear-probe top-1 on labeled shards.

Both read the encoder's features (``Task.features``: the final CLS token, or the mean of the patch
tokens) of every image of ``data.train_shards`` and ``data.val_shards``, with the evaluation
transform, in one process on the CPU. The k-NN probe is the trainer's (``pipeline.probe``:
DINO's weighted vote, k=20, T=0.07, training features as the bank); the linear probe is a
multinomial logistic regression on the standardised training features (the MAE paper's linear
probe puts a BatchNorm without affine parameters before its linear layer: the same thing),
fitted to convergence by full-batch L-BFGS, then scored on the validation features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.data import build_eval_loader
from pipeline.data.device_feed import Normalize
from pipeline.probe import knn_predict
from pipeline.tasks import Task


def fit_linear_probe(features: Tensor, labels: Tensor, *, num_classes: int, weight_decay: float = 1e-4,
                     max_iter: int = 300) -> nn.Module:
    """A standardisation and a linear layer fitted to ``features`` (samples, dim) and ``labels`` (samples,):
    cross-entropy + ``weight_decay`` x |W|^2 / 2, from zero weights (the same answer every time)."""
    features = features.double()
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    x = (features - mean) / std  # (samples, dim)
    linear = nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), labels) + 0.5 * weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return nn.Sequential(Standardize(mean, std), linear).requires_grad_(False)


class Standardize(nn.Module):
    """(x - mean) / std with the training features' statistics, in float64."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x.double() - self.mean) / self.std


def linear_probe_top1(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, **fit_options) -> float:
    """Top-1 on (val_x, val_y) of a linear probe fitted on (train_x, train_y)."""
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    probe = fit_linear_probe(train_x, train_y, num_classes=num_classes, **fit_options)
    return float((probe(val_x).argmax(dim=1) == val_y).double().mean())


def knn_top1(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *, k: int = 20,
             temperature: float = 0.07) -> float:
    """Top-1 of the trainer's k-NN probe (cosine, DINO's weighted vote), training features as the bank."""
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    predicted = knn_predict(val_x, train_x, train_y, k=k, temperature=temperature, num_classes=num_classes)
    return float((predicted == val_y).double().mean())


@torch.no_grad()
def split_features(model: nn.Module, task: Task, cfg: Config, split: str) -> tuple[Tensor, Tensor]:
    """Features (samples, hidden) per ``cfg.probe.features`` and labels (samples,) of every labeled
    image of ``split`` ("train" or "val"), evaluation transform, fp32, one process."""
    loader = build_eval_loader(cfg.data, image_size=cfg.model.image_hw, num_channels=cfg.model.num_channels,
                               rank=0, world_size=1, sample_keys=("cls",), split=split)
    if loader is None:
        raise ValueError(f"data.{split}_shards is not set: the probes need labeled {split} shards")
    normalize = Normalize(cfg.data.mean, cfg.data.std, cfg.model.num_channels)
    model.eval()
    features, labels = [], []
    for batch in loader:
        keep = batch["valid"] & (batch["label"] >= 0)  # padding and unlabeled samples out
        cls, mean = task.features(model, normalize(batch["image"]))
        features.append((cls if cfg.probe.features == "cls" else mean).float()[keep])
        labels.append(batch["label"][keep])
    return torch.cat(features), torch.cat(labels)


def probe_encoder(model: nn.Module, task: Task, cfg: Config) -> dict[str, float]:
    """{"knn_top1", "linear_top1"} of ``model``'s frozen encoder: bank / fit on the train split,
    scored on the validation split."""
    train_x, train_y = split_features(model, task, cfg, "train")
    val_x, val_y = split_features(model, task, cfg, "val")
    return {"knn_top1": knn_top1(train_x, train_y, val_x, val_y, k=cfg.probe.k, temperature=cfg.probe.temperature),
            "linear_top1": linear_probe_top1(train_x, train_y, val_x, val_y)}
