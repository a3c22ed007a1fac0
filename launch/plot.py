"""Draw a run's curves: `python launch/plot.py RUN_DIR [--out RUN_DIR/curves.png]`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in '{run_dir}'; is it a run's train.output_dir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_top1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
        axes[1].plot([r["step"] for r in val], [r["val_top1"] for r in val], "o-", label="top-1")
        axes[1].plot([r["step"] for r in val], [r["val_top5"] for r in val], "o-", label="top-5")
    axes[2].plot([r["step"] for r in train], [r["samples_per_s"] for r in train], label="images/s")
    for ax, title in zip(axes, ("loss", "validation accuracy", "throughput")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
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
