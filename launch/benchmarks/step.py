"""The ``step`` benchmark: one training step through our DeepSpeed engine (ZeRO 0-3, one process)
against a plain PyTorch AdamW step on the same model, weights and batch, per training objective.

Contenders take turns (interleaved repetitions), medians compared: ``overhead_pct`` =
(engine / plain - 1) x 100 per ZeRO stage (goal: <= 10%). Both steps do the same work:
forward, the task's fp32 loss, backward, gradient clipping, AdamW, LR schedule. In bf16 the
plain step and ZeRO-0 run autocast over fp32 weights; ZeRO 1-3 run DeepSpeed's bf16 mode (bf16
weights and gradients, fp32 master copy in the optimizer), so they do different arithmetic.

``--objectives classification mae simmim`` times the masked-image objectives' steps (the task's
loss, masks included; MAE with HF's default 8 x 512 decoder) beside classification's, all in the
same rounds: ``cost_vs_classification`` = a step's median / classification's median of the same
contender (plain, or ZeRO stage), for the whole step and for its forward+backward alone
(``fwd_bwd_s``; ``optimizer_s`` is the rest). ``--clock cpu`` times this process's CPU time
instead of wall time: on a machine with more runnable threads than cores, with one thread.

``--layer-decay X`` adds, per ZeRO stage, the classification step (fine-tuning's) with ``optim.layer_decay=X`` (MAE's
layer-wise LR decay: 2 x (layers + 2) parameter groups instead of 2, so ZeRO flattens, reduces
and steps many smaller buffers, DeepSpeed #2125) in the same rounds: ``vs_without_layer_decay`` =
its median / the stage's median without (goal: <= 1.05).

``--ema-decay D`` adds, per stage, the classification step with an EMA of the weights
(``train.ema_decay=D``) in the same rounds: ``zero<S>_ema``, whose ``ema_cost_pct`` is its median
against ``zero<S>``'s.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from launch.benchmarks import training_steps
from launch.benchmarks.common import CLOCKS, interleaved, option, set_threads, summarize
from pipeline.heap import keep_heap

OBJECTIVES = ("classification", "mae", "simmim")
# 21 rounds: with 7, medians on a 2-core VM did not resolve the 10% line (docs/DECISIONS.md,
# Benchmarks); a run takes ~4.5 min there.
DEFAULTS = dict(size="S/16", batch_size=8, image_size=None, precisions=["fp32", "bf16"], stages=[0, 1, 2, 3],
                repeats=21, warmup=2, threads=None, objectives=["classification"], clock="wall", plain=True,
                overrides=[], augment=[], layer_decay=None, ema_decay=0.0)
LAYER_DECAY_GOAL = 1.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", help="model size (default S/16)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="images per step (default 8)")
    parser.add_argument("--image-size", dest="image_size", type=int, help="pixels per side (default: the size's, 224)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], help="default: fp32 bf16")
    parser.add_argument("--stages", nargs="+", type=int, choices=[0, 1, 2, 3], help="ZeRO stages (default 0-3)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 21)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES,
                        help="training objectives timed side by side (default classification)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), help="wall (default) or this process's CPU time")
    parser.add_argument("--plain", type=lambda s: s.lower() in ("1", "true", "yes"),
                        help="also time the plain AdamW step (default true; false saves its memory)")
    parser.add_argument("--overrides", nargs="+", metavar="KEY=VALUE",
                        help="config overrides for every step, as the trainer takes them (e.g. a smaller "
                             "MAE decoder: model.decoder_hidden_size=64)")
    parser.add_argument("--augment", nargs="+", metavar="KEY=VALUE",
                        help="also time each ZeRO stage with these overrides added (e.g. data.mixup=0.8 "
                             "data.cutmix=1.0 data.reprob=0.25), as zero<N>_augmented, in the same rounds; "
                             "vs_unaugmented = its median / zero<N>'s")
    parser.add_argument("--layer-decay", dest="layer_decay", type=float,
                        help="also time every ZeRO stage with optim.layer_decay=X, side by side (goal <= 1.05x)")
    parser.add_argument("--ema-decay", dest="ema_decay", type=float,
                        help="also time each stage's step with train.ema_decay=D (default 0: not)")


def contender_name(objective: str, step: str) -> str:
    return step if objective == "classification" else f"{objective}_{step}"


def build_contenders(opts: dict, precision: str) -> dict[str, tuple[str, str, object]]:
    """name -> (objective, step kind, step function), every objective on its own seeded model."""
    clock = CLOCKS[opts["clock"]]
    contenders = {}
    for objective in opts["objectives"]:
        def config(stage: int = 0, extra: tuple[str, ...] = ()):
            return training_steps.train_config(opts["size"], batch_size=opts["batch_size"], precision=precision,
                                               image_size=opts["image_size"], zero_stage=stage, objective=objective,
                                               extra=[*opts["overrides"], *extra])

        images, labels = training_steps.synthetic_batch(config())
        if opts["plain"]:
            step = training_steps.plain_step(config(), training_steps.build_seeded_model(config()), images, labels,
                                             clock=clock)
            contenders[contender_name(objective, "plain_adamw")] = (objective, "plain_adamw", step)
        for stage in opts["stages"]:
            step, _ = training_steps.engine_step(config(stage), training_steps.build_seeded_model(config(stage)),
                                                 images, labels, clock=clock)
            contenders[contender_name(objective, f"zero{stage}")] = (objective, f"zero{stage}", step)
            if opts["augment"]:  # the device-side batch augmentations (mixup, cutmix, erasing) on top
                augmented = config(stage, tuple(opts["augment"]))
                step, _ = training_steps.engine_step(augmented, training_steps.build_seeded_model(augmented),
                                                     images, labels, clock=clock)
                contenders[contender_name(objective, f"zero{stage}_augmented")] = (objective, f"zero{stage}", step)
            if opts["layer_decay"] is not None and objective == "classification":  # fine-tuning's objective
                decayed = config(stage, (f"optim.layer_decay={opts['layer_decay']}",))
                step, _ = training_steps.engine_step(decayed, training_steps.build_seeded_model(decayed), images,
                                                     labels, clock=clock)
                kind = f"zero{stage}_layer_decay"
                contenders[contender_name(objective, kind)] = (objective, kind, step)
            if opts["ema_decay"] and objective == "classification":
                step, _ = training_steps.engine_step(config(stage, (f"train.ema_decay={opts['ema_decay']}",)),
                                                     training_steps.build_seeded_model(config(stage)), images, labels,
                                                     clock=clock)
                contenders[contender_name(objective, f"zero{stage}_ema")] = (objective, f"zero{stage}_ema", step)
    return contenders


def first_losses(contenders: dict) -> dict[str, float]:
    """Each step's first loss, every one after the same reseed: a synthetic batch's masks come from
    the default generator, so MAE's and SimMIM's contenders then draw the same masks, and equal
    losses show that the steps compute the same thing (a check, not a timing)."""
    losses = {}
    for name, (_, _, step) in contenders.items():
        torch.manual_seed(0)
        losses[name] = round(step(), 4)
    return losses


def run_precision(opts: dict, precision: str) -> dict:
    contenders = build_contenders(opts, precision)
    first_loss = first_losses(contenders)
    times = interleaved({name: c[2] for name, c in contenders.items()}, repeats=opts["repeats"],
                        warmup=max(0, opts["warmup"] - 1), clock=opts["clock"])
    stats = {}
    for name, (objective, kind, step) in contenders.items():
        s = {"objective": objective, "step": kind, **summarize(times[name]), "first_loss": first_loss[name]}
        timed = step.phases[-opts["repeats"]:]  # the timed rounds' (forward+backward, optimizer) seconds
        if timed:
            s["fwd_bwd_s"] = round(statistics.median(p[0] for p in timed), 4)
            s["optimizer_s"] = round(statistics.median(p[1] for p in timed), 4)
        stats[name] = s
    for name, s in stats.items():
        plain = stats.get(contender_name(s["objective"], "plain_adamw"))
        s["overhead_pct"] = round(100 * (s["median_s"] / plain["median_s"] - 1), 1) if plain else None
        if name.endswith("_augmented"):
            s["vs_unaugmented"] = round(s["median_s"] / stats[name[:-len("_augmented")]]["median_s"], 4)
        if s["step"].endswith("_layer_decay"):
            without = stats[contender_name(s["objective"], s["step"].removesuffix("_layer_decay"))]
            s["vs_without_layer_decay"] = round(s["median_s"] / without["median_s"], 3)
        if s["step"].endswith("_ema"):
            without = stats[name[:-len("_ema")]]
            s["ema_cost_pct"] = round(100 * (s["median_s"] / without["median_s"] - 1), 2)
        reference = stats.get(s["step"])  # classification's contender of the same kind
        if s["objective"] != "classification" and reference:
            s["cost_vs_classification"] = round(s["median_s"] / reference["median_s"], 3)
            if "fwd_bwd_s" in s:
                s["fwd_bwd_cost_vs_classification"] = round(s["fwd_bwd_s"] / reference["fwd_bwd_s"], 3)
    return stats


def run(args: argparse.Namespace | None = None) -> dict:
    """Step-time medians of the engine per ZeRO stage and of the plain step, per objective; overhead
    in %, and each masked-image step's cost against classification's."""
    opts = {k: option(args, k, v) for k, v in DEFAULTS.items()}
    threads = set_threads(opts["threads"])
    keep_heap()  # as the trainer does on CPU (pipeline/heap.py): every contender gets it
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
        for s in stats.values():
            result["rows"].append({"precision": precision, "objective": s["objective"], "step": s["step"],
                                   "median_s": s["median_s"], "min_s": s["min_s"], "max_s": s["max_s"],
                                   "fwd_bwd_s": s.get("fwd_bwd_s"), "optimizer_s": s.get("optimizer_s"),
                                   "overhead_%": s["overhead_pct"],
                                   "vs_classification": s.get("cost_vs_classification"),
                                   "fwd_bwd_vs_classification": s.get("fwd_bwd_cost_vs_classification"),
                                   "vs_without_layer_decay": s.get("vs_without_layer_decay"),
                                   "first_loss": s["first_loss"], "vs_unaugmented": s.get("vs_unaugmented"),
                                   **({"ema_cost_%": s["ema_cost_pct"]} if "ema_cost_pct" in s else {})})
    overheads = [s["overhead_pct"] for p in result["precisions"].values() for s in p.values()
                 if s["step"] != "plain_adamw" and s["overhead_pct"] is not None]
    result["summary"] = {"max_overhead_pct": max(overheads) if overheads else None,  # None: no plain step timed
                         "goal_overhead_le_10pct_met": max(overheads) <= 10.0 if overheads else None}
    decay_costs = [s["vs_without_layer_decay"] for p in result["precisions"].values() for s in p.values()
                   if "vs_without_layer_decay" in s]
    if decay_costs:
        result["summary"]["max_layer_decay_cost_x"] = max(decay_costs)
        result["summary"][f"goal_layer_decay_le_{LAYER_DECAY_GOAL}x_met"] = max(decay_costs) <= LAYER_DECAY_GOAL
    for precision, stats in result["precisions"].items():
        for name, s in stats.items():
            if "cost_vs_classification" in s:
                result["summary"][f"{precision} {name} cost_vs_classification"] = s["cost_vs_classification"]
    return result
