"""The main job (`make demo`): digits shards, then a real 2-process ZeRO-2 bf16 pretraining run on CPU.

Writes shards to data/digits (once), trains configs/digits_tiny.yaml under torchrun with two
ranks, draws the curves, and prints where metrics, checkpoints and the plot are.
Extra arguments are passed to the trainer as overrides, e.g. `make demo ARGS="train.max_steps=100"`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_tiny.yaml"
SHARDS = ROOT / "data" / "digits"


def run(command: list[str], env: dict | None = None) -> None:
    print("+", " ".join(command), flush=True)
    code = subprocess.call(command, cwd=ROOT, env=env)
    if code != 0:
        sys.exit(code)


def main() -> int:
    overrides = sys.argv[1:]
    started = time.perf_counter()
    if not (SHARDS / "manifest.json").is_file():
        run([sys.executable, "launch/make_shards.py", "--source", "digits", "--out", str(SHARDS),
             "--shard-size", "405", "--val-fraction", "0.1", "--workers", "2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    output_dir = ROOT / "runs" / "digits_tiny"
    for override in overrides:  # a user's train.output_dir=... wins, and the summary follows it
        if override.startswith("train.output_dir="):
            output_dir = Path(override.split("=", 1)[1]).resolve()
    train_started = time.perf_counter()
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "launch/pretrain.py", "--config", str(CONFIG), f"train.output_dir={output_dir}",
         "checkpoint.resume=none", "checkpoint.overwrite=true", *overrides], env=env)
    train_seconds = time.perf_counter() - train_started
    run([sys.executable, "launch/plot.py", str(output_dir)])
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in rows if "val_top1" in r][-1]
    print(f"\nvalidation top-1 {last_eval['val_top1']:.2%}, top-5 {last_eval['val_top5']:.2%} at step "
          f"{last_eval['step']}; training took {train_seconds:.0f} s ({time.perf_counter() - started:.0f} s in all)")
    print(f"metrics:     {output_dir / 'metrics.jsonl'} (TensorBoard: {output_dir / 'tensorboard'})")
    print(f"checkpoints: {output_dir / 'checkpoints'}")
    print(f"plot:        {output_dir / 'curves.png'}")
    print(f"export:      python launch/export.py --checkpoint {output_dir} --out {output_dir / 'hf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
