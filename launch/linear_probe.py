"""Probe a frozen encoder: `python launch/linear_probe.py --model RUN_OR_HF_DIR [--shards DIR]`.

k-NN and linear-probe top-1 of the encoder of a run directory (any objective: its newest
checkpoint) or of an HF export (`launch/export.py`, `--encoder-only` too), on labeled shards:
`--shards` names a `make_shards.py` output (its manifest lists the train- and val- shards); without
it, a run's own `data.train_shards` and `data.val_shards`. Exit code 2: a mistake in what to probe.
The MAE demo (`make demo ARGS="--objective mae"`) calls ``probe_encoder`` directly.

Both read the encoder's features (``Task.features``: the final CLS token, or the mean of the patch
tokens) of every image of ``data.train_shards`` and ``data.val_shards``, with the evaluation
transform, in one process on the CPU. The k-NN probe is the trainer's (``pipeline.probe``:
DINO's weighted vote, k=20, T=0.07, training features as the bank); the linear probe is a
multinomial logistic regression on the standardised training features (the MAE paper's linear
probe puts a BatchNorm without affine parameters before its linear layer: the same thing),
fitted to convergence by full-batch L-BFGS, then scored on the validation features.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.startup import collector_paused  # noqa: E402

with collector_paused():  # torch, torchvision and the tasks (pipeline/startup.py)
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    from pipeline.config import Config
    from pipeline.data import build_eval_loader
    from pipeline.data.device_feed import Normalize
    from pipeline.errors import UserError
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
        raise UserError(f"data.{split}_shards is not set: the probes need labeled {split} shards; give a "
                        "make_shards.py output with --shards DIR")
    normalize = Normalize(cfg.data.mean, cfg.data.std, cfg.model.num_channels)
    model.eval()
    features, labels = [], []
    for batch in loader:
        keep = batch["valid"] & (batch["label"] >= 0)  # padding and unlabeled samples out
        cls, mean = task.features(model, normalize(batch["image"]))
        features.append((cls if cfg.probe.features == "cls" else mean).float()[keep])
        labels.append(batch["label"][keep])
    if not any(len(part) for part in labels):
        raise UserError(f"the {split} shards of {cfg.data.train_shards if split == 'train' else cfg.data.val_shards} "
                        "carry no labels (.cls): the probes need labeled shards (make_shards without --unlabeled)")
    return torch.cat(features), torch.cat(labels)


def probe_encoder(model: nn.Module, task: Task, cfg: Config, counts: bool = False) -> dict[str, float]:
    """{"knn_top1", "linear_top1"} of ``model``'s frozen encoder: bank / fit on the train split,
    scored on the validation split (``counts``: and the number of images of each)."""
    train_x, train_y = split_features(model, task, cfg, "train")
    val_x, val_y = split_features(model, task, cfg, "val")
    figures = {"knn_top1": knn_top1(train_x, train_y, val_x, val_y, k=cfg.probe.k, temperature=cfg.probe.temperature),
               "linear_top1": linear_probe_top1(train_x, train_y, val_x, val_y)}
    return {**figures, "train_samples": len(train_y), "val_samples": len(val_y)} if counts else figures


class EncoderFeatures:
    """``Task.features`` for any ViT encoder: (CLS token, mean of the patch tokens) of its final
    LayerNormed output, what the masked tasks' ``encoder_features`` return."""

    @staticmethod
    def features(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        tokens = model.vit(images).last_hidden_state  # (batch, 1 + patches, hidden)
        return tokens[:, 0], tokens[:, 1:].mean(dim=1)


def shard_overrides(shards: Path) -> list[str]:
    """data.train_shards and data.val_shards of a make_shards output, from its manifest."""
    try:
        manifest = json.loads((shards / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"--shards {shards}: no readable manifest.json ({error}); give a make_shards.py output") from None
    names = [s["name"] if isinstance(s, dict) else s for s in manifest.get("shards", [])]
    train = [str(shards / n) for n in names if n.startswith("train")]
    val = [str(shards / n) for n in names if n.startswith("val")]
    if not train or not val:
        raise UserError(f"--shards {shards}: the manifest lists no train- and val- shards; write them with "
                        "make_shards.py --val-fraction 0.1")
    return [f"data.train_shards=[{','.join(train)}]", f"data.val_shards=[{','.join(val)}]"]


def probe_config(model_dir: Path, shards: Path | None) -> Config:
    """The run's config (a run directory) or one built from an HF directory's config.json and
    preprocessor_config.json, with the shards to probe on and decoding in this process."""
    from pipeline.config import load_config
    from pipeline.model.hf import CONFIG_NAME, from_pretrained

    data = ["data.num_workers=0", *(shard_overrides(shards) if shards is not None else [])]
    if (model_dir / "config.yaml").is_file():
        return load_config(model_dir / "config.yaml", data)
    if not (model_dir / CONFIG_NAME).is_file():
        raise UserError(f"--model {model_dir}: neither a run directory (config.yaml) nor an HF directory "
                        "(config.json); give a train.output_dir or a launch/export.py output")
    if shards is None:
        raise UserError(f"--model {model_dir} is an HF directory: give the shards to probe on with --shards DIR")
    try:
        model_cfg = from_pretrained(model_dir).config
    except ValueError as error:
        raise UserError(f"--model {model_dir}: {error}") from None
    processor = model_dir / "preprocessor_config.json"
    if processor.is_file():
        values = json.loads(processor.read_text())
        data += [f"data.mean={values['image_mean']}", f"data.std={values['image_std']}"]
    cfg = load_config(None, data)
    return dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, activation_checkpointing="none"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run directory (train.output_dir) or an HF directory")
    parser.add_argument("--shards", type=Path, default=None,
                        help="a make_shards.py output with labels (default: the run's own shards)")
    parser.add_argument("--features", choices=("cls", "mean"), default=None,
                        help="the CLS token or the mean of the patch tokens (default: the run's probe.features)")
    parser.add_argument("--k", type=int, default=None, help="k-NN neighbours (default: the run's probe.k, 20)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipeline.errors import one_line
    from pipeline.init_from import load_encoder
    from pipeline.model import ViTForImageClassification

    try:
        if args.k is not None and args.k < 1:
            raise UserError(f"--k {args.k}: give a positive count of neighbours")
        model_dir = Path(args.model)
        cfg = probe_config(model_dir, args.shards)
        probe = dataclasses.replace(cfg.probe, **{k: v for k, v in (("features", args.features), ("k", args.k))
                                                  if v is not None})
        cfg = dataclasses.replace(cfg, probe=probe)
        model = ViTForImageClassification(cfg.model)
        load_encoder(model, model_dir)  # the encoder alone, as train.init_from takes it
        figures = probe_encoder(model, EncoderFeatures(), cfg, counts=True)
    except (UserError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"{model_dir}: k-NN top-1 {figures['knn_top1']:.2%} (k={cfg.probe.k}, T={cfg.probe.temperature}), "
          f"linear-probe top-1 {figures['linear_top1']:.2%} ({cfg.probe.features} features; bank and fit on "
          f"{figures['train_samples']} training images, scored on {figures['val_samples']} validation images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
