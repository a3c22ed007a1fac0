"""The DeiT recipe on the demo's digits, each piece off in turn, beside the plain recipe; and the MAE
demo's fine-tuning with and without MAE's layer decay. Real 2-rank CPU runs, one after the other.

    python docs/benchmarks/digits_recipe_ablation.py --out runs/ablation [--json docs/benchmarks/X.json]

Every classification run is 900 steps (configs/digits_deit.yaml: 36 epochs of 25 steps;
configs/digits_tiny.yaml: max_steps 900) and reports its last evaluation's top-1 (and the EMA's
where the EMA is on). The MAE part pretrains configs/digits_mae.yaml as the demo does, then
fine-tunes configs/digits_tiny.yaml from its encoder (train.init_from), once as the demo does and
once with optim.layer_decay (MAE's 0.65 for B/16 and 0.75 for L/16, here with 4 layers: 0.75).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DEIT_OFF = {  # a piece of configs/digits_deit.yaml, off
    "DeiT recipe (configs/digits_deit.yaml)": [],
    "  - RandAugment": ["data.auto_augment=null"],
    "  - mixup/cutmix": ["data.mixup=0.0", "data.cutmix=0.0"],
    "  - random erasing": ["data.reprob=0.0"],
    "  - repeated augmentation": ["data.aug_repeats=1"],
    "  - drop path": ["model.drop_path_rate=0.0"],
    "  - EMA": ["train.ema_decay=0.0"],
}


def train(config: str, out: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "launch/pretrain.py"), "--config", str(ROOT / config), f"train.output_dir={out}",
               "checkpoint.resume=none", "checkpoint.overwrite=true", "train.progress_bar=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{out.name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val_top1" in r or "val_loss" in r][-1]
    return {"config": config, "overrides": overrides, "step": last["step"], "val_top1": last.get("val_top1"),
            "val_top1_ema": last.get("val_top1_ema"), "val_loss": last.get("val_loss"),
            "wall_s": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--json", default=None)
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--parts", nargs="+", choices=("deit", "mae"), default=["deit", "mae"])
    # The configs say bf16; a CPU without AVX512-BF16 emulates it (a 512x64 @ 64x256 matmul: 8.3 ms in
    # bf16 against 0.29 ms in fp32 on the 2-core EPYC VM), so a 900-step run takes ~6.5 min instead of ~2.
    parser.add_argument("--precision", choices=("as-configured", "fp32", "bf16"), default="as-configured")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shards = out / "digits"
    if not (shards / "manifest.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--source", "digits", "--out",
                        str(shards), "--shard-size", "405", "--val-fraction", "0.1", "--workers", "2"], check=True)
    data = [f"data.train_shards={shards}/train-{{000000..000003}}.tar", f"data.val_shards={shards}/val-000000.tar"]
    if args.precision != "as-configured":
        data.append(f"train.precision={args.precision}")
    results: dict[str, dict] = {}

    def record(name: str, row: dict) -> None:
        results[name] = row
        ema = f"  EMA {row['val_top1_ema']:.2%}" if row.get("val_top1_ema") is not None else ""
        top1 = f"top-1 {row['val_top1']:.2%}" if row.get("val_top1") is not None else f"val loss {row['val_loss']:.4f}"
        print(f"{name:<44} step {row['step']:>4}  {top1}{ema}  {row['wall_s']:.0f} s", flush=True)

    if "deit" in args.parts:
        record("plain recipe (configs/digits_tiny.yaml)", train("configs/digits_tiny.yaml", out / "plain", data))
        for i, (name, off) in enumerate(DEIT_OFF.items()):
            record(name, train("configs/digits_deit.yaml", out / f"deit-{i}", [*data, *off]))
    if "mae" in args.parts:
        mae = out / "mae"
        record("MAE pretraining (configs/digits_mae.yaml)", train("configs/digits_mae.yaml", mae, data))
        record("fine-tuned from MAE, as the demo", train("configs/digits_tiny.yaml", out / "ft", [
            *data, f"train.init_from={mae}"]))
        record(f"fine-tuned from MAE, layer decay {args.layer_decay}", train("configs/digits_tiny.yaml", out / "ft-ld", [
            *data, f"train.init_from={mae}", f"optim.layer_decay={args.layer_decay}"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
