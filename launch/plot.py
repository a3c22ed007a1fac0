"""Draw a run's curves: `python launch/plot.py RUN_DIR [--out RUN_DIR/curves.png]`.

Loss (training, and validation: cross-entropy for classification, the reconstruction loss for
mae/simmim), validation accuracy (top-1/top-5 of a classifier; the k-NN probe's top-1 of a
pretraining run whose shards carry labels), and throughput.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Validation accuracies a run may report, and their legend.
ACCURACIES = (("val_top1", "top-1"), ("val_top5", "top-5"), ("val_knn_top1", "k-NN top-1"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in '{run_dir}'; is it a run's train.output_dir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw(rows: list[dict]):
    """The figure of a run's metrics rows (matplotlib, not shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    for key, label in ACCURACIES:
        points = [(r["step"], r[key]) for r in val if key in r]
        if points:
            axes[1].plot(*zip(*points), "o-", label=label)
    axes[2].plot([r["step"] for r in train], [r["samples_per_s"] for r in train], label="images/s")
    for ax, title in zip(axes, ("loss", "validation accuracy", "throughput")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = draw(read_metrics(run_dir))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        out = plot(args.run_dir, args.out or args.run_dir / "curves.png")
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
