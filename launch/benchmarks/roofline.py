"""The ``roofline`` benchmark: the training step's achieved FLOP/s over this machine's matmul FLOP/s.

Numerator: analytic training FLOPs (``vit_flops``: matmuls incl. attention, 3 x forward) per
step / the step's median time. Denominator: the best of ``mm_repeats`` square ``torch.mm`` of
``mm_size`` in the same precision (bf16 tensors for bf16), measured in the same run before and
after the steps (the higher is the ceiling). Timed side by side:

- ``ours_fwd_bwd``: our model, forward + backward only (what the ``model`` suite times for every peer);
- ``ours_train_step``: the full plain step (+ loss, clipping, AdamW, LR schedule);
- ``ours_compiled_fwd_bwd``: the same with every encoder layer torch.compile'd (``train.compile``);
  its compilation happens in the warm-up rounds;
- ``ours_bf16_weights_fwd_bwd`` (bf16 only): the model held in bf16, no autocast: how the shipped
  configs (ZeRO-2, bf16: DeepSpeed's bf16 mode, fp32 master copy in the optimizer) run it;
- ``timm_fwd_bwd``: timm's VisionTransformer with our weights, the reference peer.

Goals on CPU: >= 93% of the matmul in fp32 and >= 80% in bf16.
"""
from __future__ import annotations

import argparse

import torch

from launch.benchmarks import peers, training_steps
from launch.benchmarks.common import interleaved, option, set_threads, summarize
from pipeline.metrics import measure_matmul_flops as matmul_flops
from launch.benchmarks.model import train_step_fn
from pipeline.compiling import compile_layers
from pipeline.heap import keep_heap
from pipeline.model import vit_flops

DEFAULTS = dict(size="S/16", batch_size=8, image_size=None, precisions=["fp32", "bf16"], repeats=5, warmup=1,
                mm_size=2048, mm_repeats=5, threads=None, peer=True, compile=True)
GOALS = {"fp32": 0.93, "bf16": 0.80}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", help="model size (default S/16)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="images per step (default 8)")
    parser.add_argument("--image-size", dest="image_size", type=int, help="pixels per side (default: the size's)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], help="default: fp32 bf16")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    parser.add_argument("--mm-size", dest="mm_size", type=int, help="square matmul side (default 2048)")
    parser.add_argument("--mm-repeats", dest="mm_repeats", type=int, help="matmuls, best taken (default 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--no-peer", dest="peer", action="store_false", default=None,
                        help="skip timm's fwd+bwd reference")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                        help="skip the torch.compile'd (per layer) fwd+bwd")


def run_precision(opts: dict, precision: str) -> dict:
    cfg = training_steps.train_config(opts["size"], batch_size=opts["batch_size"], precision=precision,
                                      image_size=opts["image_size"])
    images, labels = training_steps.synthetic_batch(cfg)
    model = training_steps.build_seeded_model(cfg)
    plain = training_steps.plain_step(cfg, training_steps.build_seeded_model(cfg), images, labels)
    contenders = {"ours_fwd_bwd": train_step_fn(model, lambda x: model(x).logits, images, precision),
                  "ours_train_step": plain}
    if opts["compile"]:  # train.compile=true: every encoder layer compiled (the first call compiles)
        compiled = training_steps.build_seeded_model(cfg)
        compile_layers(compiled)
        contenders["ours_compiled_fwd_bwd"] = train_step_fn(compiled, lambda x: compiled(x).logits, images, precision)
    if precision == "bf16":  # as DeepSpeed's bf16 mode (ZeRO 1-3) holds the model: no casts per step
        held = training_steps.build_seeded_model(cfg).to(torch.bfloat16)
        pixels = images.to(torch.bfloat16)
        contenders["ours_bf16_weights_fwd_bwd"] = train_step_fn(held, lambda x: held(x).logits, pixels, "fp32")
    if opts["peer"]:
        timm_model = peers.build_timm(cfg.model, model.vit)
        contenders["timm_fwd_bwd"] = train_step_fn(timm_model.train(), timm_model.forward_features, images, precision)
    dtype = DTYPES[precision]
    mm_before = matmul_flops(dtype, size=opts["mm_size"], repeats=opts["mm_repeats"])
    times = interleaved(contenders, repeats=opts["repeats"], warmup=opts["warmup"])
    mm_after = matmul_flops(dtype, size=opts["mm_size"], repeats=opts["mm_repeats"])
    ceiling = max(mm_before, mm_after)
    flops = vit_flops(cfg.model, opts["batch_size"])
    out = {"matmul_gflop_per_s": round(ceiling / 1e9, 1),
           "matmul_gflop_per_s_before_after": [round(mm_before / 1e9, 1), round(mm_after / 1e9, 1)],
           "gflop_per_step": round(flops / 1e9, 2), "goal_fraction": GOALS[precision], "contenders": {}}
    for name, t in times.items():
        stats = summarize(t)
        achieved = flops / stats["median_s"]
        stats.update(achieved_gflop_per_s=round(achieved / 1e9, 1), fraction_of_matmul=round(achieved / ceiling, 3))
        out["contenders"][name] = stats
    for name in ("ours_fwd_bwd", "ours_train_step"):
        out[f"{name}_goal_met"] = out["contenders"][name]["fraction_of_matmul"] >= GOALS[precision]
    return out


def run(args: argparse.Namespace | None = None) -> dict:
    """Achieved FLOP/s of fwd+bwd and of the full step against the same-precision matmul."""
    opts = {k: option(args, k, v) for k, v in DEFAULTS.items()}
    threads = set_threads(opts["threads"])
    keep_heap()  # as the trainer does on CPU (pipeline/heap.py)
    result = {"settings": {**opts, "threads": threads}, "precisions": {}, "rows": []}
    for precision in opts["precisions"]:
        figures = run_precision(opts, precision)
        result["precisions"][precision] = figures
        for name, s in figures["contenders"].items():
            result["rows"].append({"precision": precision, "step": name, "median_s": s["median_s"],
                                   "GFLOP/s": s["achieved_gflop_per_s"],
                                   "matmul GFLOP/s": figures["matmul_gflop_per_s"],
                                   "of_matmul": s["fraction_of_matmul"], "goal": GOALS[precision]})
    result["summary"] = {f"{p} {name} fraction_of_matmul": f["contenders"][name]["fraction_of_matmul"]
                         for p, f in result["precisions"].items() for name in f["contenders"]}
    result["summary"]["goal_met_fwd_bwd"] = all(f["ours_fwd_bwd_goal_met"] for f in result["precisions"].values())
    result["summary"]["goal_met_train_step"] = all(f["ours_train_step_goal_met"]
                                                   for f in result["precisions"].values())
    return result
