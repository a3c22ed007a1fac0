"""The ``step`` benchmark: one training step through our DeepSpeed engine (ZeRO 0-3, one process)
against a plain PyTorch AdamW step on the same model, weights and batch.

Contenders take turns (interleaved repetitions), medians compared: ``overhead_pct`` =
(engine / plain - 1) x 100 per ZeRO stage (goal: <= 10%). Both steps do the same work:
forward, fp32 cross-entropy, backward, gradient clipping, AdamW, LR schedule. In bf16 the plain
step and ZeRO-0 run autocast over fp32 weights; ZeRO 1-3 run DeepSpeed's bf16 mode (bf16
weights and gradients, fp32 master copy in the optimizer), so they do different arithmetic.
"""
from __future__ import annotations

import argparse

import torch

from launch.benchmarks import training_steps
from launch.benchmarks.common import interleaved, option, set_threads, summarize
from pipeline.heap import keep_heap

# 21 rounds: with 7, medians on a 2-core VM did not resolve the 10% line (docs/DECISIONS.md,
# Benchmarks); a run takes ~4.5 min there.
DEFAULTS = dict(size="S/16", batch_size=8, image_size=None, precisions=["fp32", "bf16"], stages=[0, 1, 2, 3],
                repeats=21, warmup=2, threads=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", help="model size (default S/16)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="images per step (default 8)")
    parser.add_argument("--image-size", dest="image_size", type=int, help="pixels per side (default: the size's, 224)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], help="default: fp32 bf16")
    parser.add_argument("--stages", nargs="+", type=int, choices=[0, 1, 2, 3], help="ZeRO stages (default 0-3)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 21)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")


def run_precision(opts: dict, precision: str) -> dict:
    base = training_steps.train_config(opts["size"], batch_size=opts["batch_size"], precision=precision,
                                       image_size=opts["image_size"])
    images, labels = training_steps.synthetic_batch(base)
    plain = training_steps.plain_step(base, training_steps.build_seeded_model(base), images, labels)
    contenders = {"plain_adamw": plain}
    for stage in opts["stages"]:
        cfg = training_steps.train_config(opts["size"], batch_size=opts["batch_size"], precision=precision,
                                          image_size=opts["image_size"], zero_stage=stage)
        step, _ = training_steps.engine_step(cfg, training_steps.build_seeded_model(cfg), images, labels)
        contenders[f"zero{stage}"] = step
    # The first losses agree when the steps compute the same thing (a check, not a timing).
    first_loss = {name: round(fn(), 4) for name, fn in contenders.items()}
    times = interleaved(contenders, repeats=opts["repeats"], warmup=max(0, opts["warmup"] - 1))
    stats = {name: summarize(t) for name, t in times.items()}
    plain = stats["plain_adamw"]["median_s"]
    for name, s in stats.items():
        s["overhead_pct"] = round(100 * (s["median_s"] / plain - 1), 1)
        s["first_loss"] = first_loss[name]
    return stats


def run(args: argparse.Namespace | None = None) -> dict:
    """Step-time medians of the engine per ZeRO stage and of the plain step; overhead in %."""
    opts = {k: option(args, k, v) for k, v in DEFAULTS.items()}
    threads = set_threads(opts["threads"])
    keep_heap()  # as the trainer does on CPU (pipeline/heap.py): both contenders get it
    created = training_steps.single_process_group()
    result = {"settings": {**opts, "threads": threads}, "precisions": {}, "rows": []}
    try:
        stats_by_precision = {p: run_precision(opts, p) for p in opts["precisions"]}
    finally:
        if created:  # leave no process group behind in a caller's process
            from pipeline.distributed.engine import destroy_process_group

            destroy_process_group(clean=False)
    for precision, stats in stats_by_precision.items():
        result["precisions"][precision] = stats
        for name, s in stats.items():
            result["rows"].append({"precision": precision, "step": name, "median_s": s["median_s"],
                                   "min_s": s["min_s"], "max_s": s["max_s"], "overhead_%": s["overhead_pct"],
                                   "first_loss": s["first_loss"]})
    overheads = [s["overhead_pct"] for p in result["precisions"].values() for n, s in p.items() if n != "plain_adamw"]
    result["summary"] = {"max_overhead_pct": max(overheads) if overheads else None,
                         "goal_overhead_le_10pct_met": bool(overheads) and max(overheads) <= 10.0}
    return result
