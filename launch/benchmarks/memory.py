"""The ``memory`` benchmark: activation checkpointing's memory and time, and ZeRO's per-rank state.

1. Activation checkpointing none / every-2 / all (ViT-B/16, batch 32 by default), each setting in
   its own process so that peaks don't mix. There: model + AdamW, one warm-up step (optimizer
   states and gradients exist from then on; gradients are zeroed, not freed), then the process's
   RSS is the *state*; the peak RSS counter is reset (``/proc/self/clear_refs``) and ``steps``
   steps run. ``activation_peak`` = peak RSS during the steps - state. glibc is told to hand every
   block above 64 KiB straight back to the OS (``MALLOC_MMAP_THRESHOLD_``), so RSS follows the
   live tensors instead of the allocator's cache. Goal: "all" cuts activation_peak >= 3x for at
   most 1.4x the step time.
2. ZeRO 0-3 on 2 processes (torchrun, gloo, fp32 unless told, one torchrun per stage): in the last of
   ``steps`` + 1 steps through our engine, between backward and the optimizer step, each rank
   counts the bytes of every live tensor storage reachable from Python (model, gradients,
   optimizer states, DeepSpeed's flat buffers, buckets and partitions; the batch excluded): the
   part backed by RAM (``measured``, read from /proc/self/pagemap) and the part merely
   allocated (``allocated``: what a GPU would have to hold); also its RSS growth since before
   the model was built. Predicted per rank, with P parameters, N ranks and fp32 Adam
   (Rajbhandari et al., ZeRO): stage 0 16P, stage 1 (4 + 4 + 8/N)P, stage 2 (4 + 12/N)P,
   stage 3 16P/N bytes (bf16 at stages 1-3: 2 + 2 + 12, partitioned alike).
   Goal: ZeRO-3 holds <= 55% of ZeRO-0's state per rank.
   With ``--zero-overrides train.ema_decay=D`` the step keeps an EMA of the weights, as the trainer
   does: ``ema_mib`` is its size on the worst rank and ``ema_vs_fp32_copy`` that over a whole fp32
   copy of the weights (4P). Goal: <= 0.55 at ZeRO-3 on 2 ranks (each rank averages its partition).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULTS = dict(size="B/16", batch_size=32, image_size=None, precision="bf16", settings=["none", "every-2", "all"],
                steps=2, zero_size="B/16", zero_batch_size=2, stages=[0, 1, 2, 3], nproc=2, threads=None,
                parts=["checkpointing", "zero"], zero_precision="fp32", zero_overrides=[])
ROOT = Path(__file__).resolve().parents[2]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", nargs="+", choices=["checkpointing", "zero"], help="default: both")
    parser.add_argument("--size", help="checkpointing: model size (default B/16)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="checkpointing: batch (default 32)")
    parser.add_argument("--image-size", dest="image_size", type=int, help="pixels per side (default: the size's)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="checkpointing: default bf16 (autocast)")
    parser.add_argument("--settings", nargs="+", help="checkpointing settings (default none every-2 all)")
    parser.add_argument("--steps", type=int, help="timed steps per setting/stage (default 2)")
    parser.add_argument("--zero-size", dest="zero_size", help="ZeRO: model size (default B/16)")
    parser.add_argument("--zero-batch-size", dest="zero_batch_size", type=int, help="ZeRO: batch per rank (2)")
    parser.add_argument("--stages", nargs="+", type=int, choices=[0, 1, 2, 3], help="ZeRO stages (default 0-3)")
    parser.add_argument("--nproc", type=int, help="ZeRO: processes (default 2)")
    parser.add_argument("--zero-precision", dest="zero_precision", choices=["fp32", "bf16"],
                        help="ZeRO: training precision (default fp32)")
    parser.add_argument("--zero-overrides", dest="zero_overrides", nargs="+", metavar="KEY=VALUE",
                        help="ZeRO: config overrides, e.g. deepspeed.zero_optimization.reduce_bucket_size=50000000")
    parser.add_argument("--threads", type=int, help="checkpointing: torch threads (default: all cores)")


# --- measuring inside a process ---------------------------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _resident(ptr: int, nbytes: int, pagemap) -> int:
    """Bytes of [ptr, ptr + nbytes) backed by RAM (bit 63 of each page's /proc/self/pagemap entry)."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    first, last = ptr // page, (ptr + nbytes - 1) // page
    pagemap.seek(first * 8)
    entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype=np.uint64)
    return min(nbytes, int((entries >> np.uint64(63)).sum()) * page)


def live_tensor_bytes(exclude: tuple = ()) -> dict:
    """Bytes of every distinct tensor storage reachable from Python (and their .grad), each once:
    ``allocated`` (what the storages span) and ``resident`` (the part backed by RAM: a large
    ``torch.empty`` that is never written costs address space only, on a CPU)."""
    import torch

    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def add(t) -> None:
        if t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())

    gc.collect()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                add(obj)
                if obj.grad is not None:
                    add(obj.grad)
        except Exception:  # objects half torn down, or tensor subclasses without storage
            continue
    with open("/proc/self/pagemap", "rb") as pagemap:
        resident = sum(_resident(ptr, n, pagemap) for ptr, n in seen.items() if n)
    largest = sorted(seen.values(), reverse=True)[:3]
    return {"allocated": sum(seen.values()), "resident": resident, "largest_storages": largest}


def mib(n: float) -> float:
    return round(n / 2**20, 1)


# --- part 1: activation checkpointing, one process per setting ----------------------------------

def checkpointing_worker(opts: dict) -> dict:
    import torch

    from launch.benchmarks import training_steps
    from pipeline.optim import build_optimizer
    from pipeline.tasks import build_task

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    cfg = training_steps.train_config(opts["size"], batch_size=opts["batch_size"], precision=opts["precision"],
                                      image_size=opts["image_size"], activation_checkpointing=opts["setting"])
    images, labels = training_steps.synthetic_batch(cfg)
    model = training_steps.build_seeded_model(cfg).train()
    optimizer = build_optimizer(model, cfg.optim)

    task, batch = build_task(cfg), {"image": images, "label": labels}

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            task.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: they are state, not activations

    step()
    gc.collect()
    state = rss_bytes()
    reset_peak_rss()
    times = []
    for _ in range(opts["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    times.sort()
    return {"setting": opts["setting"], "state_rss_mib": mib(state), "peak_rss_mib": mib(peak),
            "activation_peak_mib": mib(peak - state), "activation_peak_bytes": peak - state,
            "step_s": round(times[len(times) // 2], 3),
            "step_times_s": [round(t, 3) for t in times]}


def run_checkpointing(opts: dict) -> dict:
    rows = {}
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT)}
    for setting in opts["settings"]:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            out = Path(tmp, "result.json")
            command = [sys.executable, "-m", "launch.benchmarks.memory", "--worker", "checkpointing",
                       "--opts", json.dumps({**opts, "setting": setting}), "--out", str(out)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0 or not out.is_file():
                raise RuntimeError(f"memory worker ({setting}) failed, rc {done.returncode}:\n{done.stderr[-3000:]}")
            rows[setting] = json.loads(out.read_text())
    base = rows.get("none")
    for r in rows.values():
        if base:
            r["activation_cut_x"] = round(base["activation_peak_bytes"] / max(r["activation_peak_bytes"], 1), 2)
            r["time_x"] = round(r["step_s"] / base["step_s"], 3)
    result = {"settings": rows}
    if base and "all" in rows:
        result["goal_all_cuts_3x_for_1p4x_time_met"] = (rows["all"]["activation_cut_x"] >= 3.0
                                                        and rows["all"]["time_x"] <= 1.4)
    return result


# --- part 2: ZeRO stages across processes -----------------------------------------------------

def predicted_state_bytes(params: int, stage: int, ranks: int, precision: str = "fp32") -> int:
    """ZeRO paper's per-rank model+gradient+optimizer bytes with Adam: fp32 4+4+8 bytes per
    parameter; bf16 at stage >= 1 2+2+12 (bf16 weights and gradients, fp32 master + moments).
    Our bf16 ZeRO-0 is autocast over fp32 weights (engine.uses_autocast): 4+4+8."""
    if precision == "bf16" and stage >= 1:
        weights, grads, adam = 2 * params, 2 * params, 12 * params
    else:
        weights, grads, adam = 4 * params, 4 * params, 8 * params
    if stage >= 1:
        adam //= ranks
    if stage >= 2:
        grads //= ranks
    if stage >= 3:
        weights //= ranks
    return weights + grads + adam


def zero_worker(opts: dict) -> dict:
    import torch

    from launch.benchmarks import training_steps
    from pipeline.distributed.engine import destroy_process_group, init_process_group
    from pipeline.distributed.env import resolve_env

    training_steps.quiet_deepspeed()
    env = resolve_env()
    init_process_group(env, timeout_s=300)
    try:
        before = rss_bytes()
        cfg = training_steps.train_config(opts["zero_size"], batch_size=opts["zero_batch_size"],
                                          precision=opts["zero_precision"], image_size=opts["image_size"],
                                          zero_stage=opts["stage"], extra=opts["zero_overrides"])
        images, labels = training_steps.synthetic_batch(cfg, seed=env.rank)
        model = training_steps.build_seeded_model(cfg)
        params = sum(p.numel() for p in model.parameters())
        step, engine = training_steps.engine_step(cfg, model, images, labels, world_size=env.world_size)
        times, counted = [], {}

        def count() -> None:  # after backward, before the optimizer step: every kind of state exists
            counted.update(live_tensor_bytes(exclude=(images, labels)))

        for i in range(opts["steps"] + 1):  # the first creates the optimizer states
            start = time.perf_counter()
            step(count if i == opts["steps"] else None)
            times.append(time.perf_counter() - start)
        measured = counted
        result = {"rank": env.rank, "stage": opts["stage"], "params": params,
                  "predicted_bytes": predicted_state_bytes(params, opts["stage"], env.world_size,
                                                           opts["zero_precision"]),
                  "measured_tensor_bytes": measured["resident"], "allocated_tensor_bytes": measured["allocated"],
                  "largest_storage_bytes": measured["largest_storages"], "rss_growth_bytes": rss_bytes() - before,
                  "step_s": round(sorted(times[1:])[len(times[1:]) // 2], 3),
                  "ema_bytes": step.ema.nbytes() if step.ema is not None else 0}
        Path(opts["out_dir"], f"rank{env.rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()
        return result
    finally:
        destroy_process_group(clean=True)


def run_zero(opts: dict) -> dict:
    stages = {}
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    for stage in opts["stages"]:
        with tempfile.TemporaryDirectory(prefix="bench-zero-") as tmp:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={opts['nproc']}", "-m", "launch.benchmarks.memory", "--worker", "zero",
                       "--opts", json.dumps({**opts, "stage": stage, "out_dir": tmp})]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
            if len(ranks) != opts["nproc"]:
                raise RuntimeError(f"ZeRO-{stage} memory run failed, rc {done.returncode}:\n{done.stderr[-3000:]}")
        worst = max(ranks, key=lambda r: r["measured_tensor_bytes"])
        stages[stage] = {"params": worst["params"], "predicted_mib": mib(worst["predicted_bytes"]),
                         "measured_mib": mib(worst["measured_tensor_bytes"]),
                         "allocated_mib": mib(max(r["allocated_tensor_bytes"] for r in ranks)),
                         "largest_storages_mib": [mib(n) for n in worst["largest_storage_bytes"]],
                         "rss_growth_mib": mib(max(r["rss_growth_bytes"] for r in ranks)),
                         "measured_over_predicted": round(worst["measured_tensor_bytes"] / worst["predicted_bytes"], 3),
                         "step_s": max(r["step_s"] for r in ranks),
                         "torchrun_rc": done.returncode}  # rc != 0 after results were written: an exit crash
        ema = max(r["ema_bytes"] for r in ranks)
        if ema:
            stages[stage].update(ema_mib=mib(ema), ema_vs_fp32_copy=round(ema / (4 * worst["params"]), 3))
    if 0 in stages:
        for s in stages.values():
            s["vs_zero0"] = round(s["measured_mib"] / stages[0]["measured_mib"], 3)
            s["allocated_vs_zero0"] = round(s["allocated_mib"] / stages[0]["allocated_mib"], 3)
            s["predicted_vs_zero0"] = round(s["predicted_mib"] / stages[0]["predicted_mib"], 3)
    result = {"stages": {f"zero{k}": v for k, v in stages.items()}}
    if 0 in stages and 3 in stages:
        result["goal_zero3_le_55pct_of_zero0_met"] = stages[3]["vs_zero0"] <= 0.55
    if "ema_vs_fp32_copy" in stages.get(3, {}):
        result["goal_ema_zero3_le_55pct_of_fp32_copy_met"] = stages[3]["ema_vs_fp32_copy"] <= 0.55
    return result


def run(args: argparse.Namespace | None = None) -> dict:
    """Checkpointing settings (one process each) and ZeRO stages (one torchrun each)."""
    from launch.benchmarks.common import option

    opts = {k: option(args, k, v) for k, v in DEFAULTS.items()}
    result: dict = {"settings": dict(opts), "rows": []}
    if "checkpointing" in opts["parts"]:
        result["checkpointing"] = run_checkpointing(opts)
        for r in result["checkpointing"]["settings"].values():
            result["rows"].append({"part": f"ckpt {opts['size']} b{opts['batch_size']} {opts['precision']}",
                                   "setting": r["setting"], "step_s": r["step_s"], "time_x": r.get("time_x"),
                                   "state_MiB": r["state_rss_mib"], "peak_MiB": r["peak_rss_mib"],
                                   "activations_MiB": r["activation_peak_mib"], "cut_x": r.get("activation_cut_x")})
    if "zero" in opts["parts"]:
        result["zero"] = run_zero(opts)
        extra = "".join(" " + o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.split("=", 1)[-1]
                        for o in opts["zero_overrides"])  # e.g. reduce_bucket_size=..., ema_decay=...
        part = f"{opts['nproc']} ranks {opts['zero_size']} {opts['zero_precision']}{extra}"
        for name, s in result["zero"]["stages"].items():
            result["rows"].append({"part": part, "setting": name,
                                   "step_s": s["step_s"], "predicted_MiB": s["predicted_mib"],
                                   "measured_MiB": s["measured_mib"], "allocated_MiB": s["allocated_mib"],
                                   "rss_growth_MiB": s["rss_growth_mib"], "vs_zero0": s.get("vs_zero0"),
                                   "predicted_vs_zero0": s.get("predicted_vs_zero0"),
                                   **({"ema_MiB": s["ema_mib"], "ema_vs_fp32_copy": s["ema_vs_fp32_copy"]}
                                      if "ema_mib" in s else {})})
    result["summary"] = {k: v for part in ("checkpointing", "zero") if part in result
                         for k, v in result[part].items() if k.startswith("goal")}
    return result


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["checkpointing", "zero"], required=True)
    parser.add_argument("--opts", required=True)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    opts = json.loads(args.opts)
    if args.worker == "checkpointing":
        Path(args.out).write_text(json.dumps(checkpointing_worker(opts)))
    else:
        zero_worker(opts)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
