"""The DeiT recipe on the demo's digits, each piece off in turn, beside the plain recipe; and the MAE
demo's fine-tuning with and without MAE's layer decay. Real 2-rank CPU runs, one after the other.

    python docs/benchmarks/digits_recipe_ablation.py --out runs/ablation --precision fp32 \
        [--seeds 0 1] [--parts ...] [--json docs/benchmarks/X.json]

Every classification run is 900 steps (configs/digits_deit.yaml: 36 epochs of 25 steps;
configs/digits_tiny.yaml: max_steps 900) and reports its last evaluation's top-1 (and the EMA's
where the EMA is on). The plain and the DeiT recipe run at every seed of --seeds (train.seed), the
pieces off in turn at the first. "- EMA" is not a run of its own: the EMA only evaluates, so the
recipe's own run without the EMA trains the same weights; its row is that run's top-1.
The MAE part pretrains configs/digits_mae.yaml as the demo does (once, or --mae-dir: an MAE run
already made by this script), then fine-tunes from its encoder (train.init_from), at every seed:
configs/digits_tiny.yaml as the demo does, and configs/digits_mae_finetune.yaml; at the first seed
also configs/digits_tiny.yaml with optim.layer_decay alone (MAE's 0.65 for B/16 and 0.75 for L/16, here with 4 layers: 0.75).
--parts runs some of it; a run already made in --out with the same config file and overrides is read
back, not run again, so the parts gather into one JSON.
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
}


def train(config: str, out: Path, overrides: list[str]) -> dict:
    # A run already made in `out` by this script with the same config file and overrides is read back,
    # not run again (so the parts can be run one at a time and gathered into one JSON).
    recipe = {"config_text": (ROOT / config).read_text(), "overrides": overrides}
    done_file = out / "ablation_row.json"
    if done_file.is_file():
        saved = json.loads(done_file.read_text())
        if saved.pop("recipe") == recipe:
            return saved
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
    row = {"config": config, "overrides": overrides, "step": last["step"], "val_top1": last.get("val_top1"),
            "val_top1_ema": last.get("val_top1_ema"), "val_loss": last.get("val_loss"),
            "wall_s": round(seconds, 1)}
    done_file.write_text(json.dumps({**row, "recipe": recipe}))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--json", default=None)
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each run")
    parser.add_argument("--mae-dir", default=None, help="an MAE pretraining run to fine-tune from, instead of a new one")
    parser.add_argument("--parts", nargs="+", choices=("plain", "deit", "ablation", "mae", "finetune"),
                        default=["plain", "deit", "ablation", "mae", "finetune"],
                        help="mae: the pretraining, finetune: the fine-tunes from it (with --mae-dir or mae)")
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
        print(f"{name:<64} step {row['step']:>4}  {top1}{ema}  {row['wall_s']:.0f} s", flush=True)

    first = args.seeds[0]

    def seeded(seed: int) -> list[str]:
        return [*data, f"train.seed={seed}"]

    for seed in args.seeds:
        if "plain" in args.parts:
            record(f"plain recipe (configs/digits_tiny.yaml), seed {seed}",
                   train("configs/digits_tiny.yaml", out / f"plain-s{seed}", seeded(seed)))
        if "deit" in args.parts or ("ablation" in args.parts and seed == first):
            record(f"DeiT recipe (configs/digits_deit.yaml), seed {seed}",
                   train("configs/digits_deit.yaml", out / f"deit-s{seed}", seeded(seed)))
    if "ablation" in args.parts:
        for i, (name, off) in enumerate(DEIT_OFF.items()):
            if off:
                record(f"{name}, seed {first}", train("configs/digits_deit.yaml", out / f"deit-{i}-s{first}",
                                                      [*seeded(first), *off]))
        recipe = results[f"DeiT recipe (configs/digits_deit.yaml), seed {first}"]
        record(f"  - EMA, seed {first}", {**recipe, "val_top1_ema": None, "overrides": [
            *recipe["overrides"], "train.ema_decay=0.0 (the recipe's run: the EMA only evaluates)"]})
    mae = Path(args.mae_dir).resolve() if args.mae_dir else out / "mae"
    if "mae" in args.parts and not args.mae_dir:
        record("MAE pretraining (configs/digits_mae.yaml)", train("configs/digits_mae.yaml", mae, data))
    if "finetune" in args.parts:
        for seed in args.seeds:
            init = [*seeded(seed), f"train.init_from={mae}"]
            record(f"fine-tuned from MAE, as the demo, seed {seed}",
                   train("configs/digits_tiny.yaml", out / f"ft-s{seed}", init))
            if seed == first:
                record(f"fine-tuned from MAE, layer decay {args.layer_decay} alone, seed {seed}",
                       train("configs/digits_tiny.yaml", out / f"ft-ld-s{seed}", [
                           *init, f"optim.layer_decay={args.layer_decay}"]))
            record(f"fine-tuned from MAE, configs/digits_mae_finetune.yaml, seed {seed}",
                   train("configs/digits_mae_finetune.yaml", out / f"ft-recipe-s{seed}", init))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
