"""The ``gpu`` benchmark: images/s and MFU of full training steps on a CUDA GPU.

Per model size (ViT-L/16 first: the goal is >= 45% MFU there on an H100), activation
checkpointing (none / all) and torch.compile (off / per layer, as ``train.compile=true`` does):
bf16 autocast over fp32 weights, attention forced onto SDPA's flash kernel, fused AdamW, a full
step (forward, fp32 cross-entropy, backward, clip, optimizer). The batch is the largest that
fits: two probe steps give memory per image, the prediction is tried and shrunk on OOM.
MFU = analytic FLOPs (the task's: ``vit_flops``, no recompute counted) / time / the GPU's dense bf16 peak
(``pipeline.metrics.GPU_PEAK_FLOPS``); a large bf16 matmul measured in the same run is given
beside it. A time budget stops starting new configurations, so the suite ends in bounded time.
Without CUDA it says so and returns (exit 0); ``--device cpu`` runs the same code on a tiny
model, for tests. ``--objectives mae simmim`` times those tasks' steps too (their own loss and
masks; MAE with HF's default 8 x 512 decoder), their MFU from their own analytic FLOPs
(``Task.flops``: MAE's encoder sees a quarter of the patches).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from launch.benchmarks.common import option
from pipeline.metrics import measure_matmul_flops as matmul_flops
from pipeline.compiling import compile_layers

DEFAULTS = dict(sizes=["L/16", "B/16"], checkpointing=["none", "all"], compile=["off", "on"], steps=10, warmup=3,
                batch_size=None, max_batch=2048, memory_fraction=0.9, budget_s=420.0, device="cuda",
                mm_size=8192, compile_scope="layer", weights="fp32", objectives=["classification"], overrides=[])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", help="model sizes (default L/16 B/16)")
    parser.add_argument("--checkpointing", nargs="+", help="activation checkpointing settings (default none all)")
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], help="torch.compile per layer (default both)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, compilation included (default 3)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="fixed batch (default: largest that fits)")
    parser.add_argument("--max-batch", dest="max_batch", type=int, help="cap of the batch search (default 2048)")
    parser.add_argument("--memory-fraction", dest="memory_fraction", type=float,
                        help="share of GPU memory the batch search aims at (default 0.9)")
    parser.add_argument("--budget-s", dest="budget_s", type=float,
                        help="start no new configuration after this many seconds (default 420)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    parser.add_argument("--mm-size", dest="mm_size", type=int, help="reference bf16 matmul side (default 8192)")
    parser.add_argument("--compile-scope", dest="compile_scope", choices=["layer", "model"],
                        help="compile each encoder layer (as train.compile=true, default) or the whole model")
    parser.add_argument("--weights", choices=["fp32", "bf16"],
                        help="fp32 weights + bf16 autocast (default; the ZeRO-0 path) or bf16 weights without "
                             "autocast (the forward/backward of DeepSpeed's bf16 mode at ZeRO >= 1)")
    parser.add_argument("--objectives", nargs="+", choices=["classification", "mae", "simmim"],
                        help="training objectives (default classification)")
    parser.add_argument("--overrides", nargs="+", metavar="KEY=VALUE",
                        help="config overrides for every configuration, as the trainer takes them "
                             "(e.g. model.decoder_hidden_size=64, so a trainer run can be matched)")


def log(message: str) -> None:
    print(f"[gpu] {message}", file=sys.stderr, flush=True)


def sdpa_flash():
    """Attention on the flash kernel only: an unsupported shape or dtype raises instead of falling back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def run_config_of(size: str, checkpointing: str, objective: str, overrides: list[str] = ()):
    """The Config of a step of ``objective`` on the model of ``size`` (the task's own fields set)."""
    from launch.benchmarks.training_steps import train_config

    return train_config(size, batch_size=1, precision="bf16", activation_checkpointing=checkpointing,
                        objective=objective, extra=list(overrides))


class Trainee:
    """A model, its fused AdamW and one full bf16-autocast training step of the run's task."""

    def __init__(self, run_cfg, device: torch.device, compiled: bool, scope: str = "layer", weights: str = "fp32"):
        from pipeline.config import OptimConfig
        from pipeline.optim import build_optimizer
        from pipeline.tasks import build_task

        torch.manual_seed(0)
        cfg = run_cfg.model
        self.task = build_task(run_cfg)
        self.model = self.task.build_model(cfg).to(device).train()
        if weights == "bf16":
            self.model.to(torch.bfloat16)
        self.autocast = weights == "fp32"
        if compiled and scope == "model":
            self.model.compile()
        elif compiled:
            compile_layers(self.model)  # per layer, as train.compile=true
        self.optimizer = build_optimizer(self.model, OptimConfig())
        self.cfg, self.device = cfg, device

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(size, self.cfg.num_channels, *self.cfg.image_hw, device=self.device)
        labels = torch.randint(0, self.cfg.num_labels, (size,), device=self.device)
        return images, labels

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast), sdpa_flash():
            loss = self.task.loss(self.model, {"image": images, "label": labels})  # the trainer's loss
        with sdpa_flash():
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes_of_step(trainee: Trainee, size: int) -> int:
    free(trainee.device)
    images, labels = trainee.batch(size)
    trainee.step(images, labels)
    sync(trainee.device)
    return torch.cuda.max_memory_allocated(trainee.device)


def largest_batch(trainee: Trainee, opts: dict) -> dict:
    """Two probe steps give bytes per image; predict the batch that fills ``memory_fraction``,
    rounded down to a multiple of 8, then shrink by 15% per OOM."""
    total = torch.cuda.get_device_properties(trainee.device).total_memory
    small, large = 8, 32
    m_small, m_large = peak_bytes_of_step(trainee, small), peak_bytes_of_step(trainee, large)
    per_image = max(1, (m_large - m_small) / (large - small))
    fixed = m_small - small * per_image
    batch = int((opts["memory_fraction"] * total - fixed) / per_image) // 8 * 8
    batch = max(8, min(batch, opts["max_batch"]))
    tries: list = []
    while True:
        try:
            peak = peak_bytes_of_step(trainee, batch)
            tries.append(batch)
            return {"batch": batch, "peak_gib": round(peak / 2**30, 2), "per_image_mib": round(per_image / 2**20, 1),
                    "fixed_gib": round(fixed / 2**30, 2), "tried": tries}
        except Exception as err:  # noqa: BLE001 - an OOM shrinks the batch, anything else is raised
            if not is_oom(err) or batch <= 8:
                raise
        # Outside the except block: the traceback (and the tensors its frames hold) is gone by now.
        tries.append(f"{batch} OOM")
        recover(trainee)
        batch = max(8, int(batch * 0.85) // 8 * 8)


def recover(trainee: Trainee) -> None:
    """After an OOM: drop the half-made gradients and the allocator's cache."""
    trainee.optimizer.zero_grad(set_to_none=True)
    free(trainee.device)


def time_steps(trainee: Trainee, batch: int, opts: dict) -> dict:
    images, labels = trainee.batch(batch)
    start = time.perf_counter()
    trainee.step(images, labels)  # compiles, when compiled
    sync(trainee.device)
    first = time.perf_counter() - start
    for _ in range(max(0, opts["warmup"] - 1)):
        trainee.step(images, labels)
    sync(trainee.device)
    times = []
    for _ in range(opts["steps"]):
        start = time.perf_counter()
        trainee.step(images, labels)
        sync(trainee.device)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"first_step_s": round(first, 2), "step_s": times[len(times) // 2], "steps": len(times)}


def run_config(size: str, checkpointing: str, compiled: bool, opts: dict, device: torch.device, peak: float,
               objective: str = "classification") -> dict:
    run_cfg = run_config_of(size, checkpointing, objective, opts["overrides"])
    trainee = Trainee(run_cfg, device, compiled, opts["compile_scope"], opts["weights"])
    row: dict = {"objective": objective, "size": size, "checkpointing": checkpointing,
                 "compile": opts["compile_scope"] if compiled else False, "weights": opts["weights"]}
    if opts["batch_size"] or device.type != "cuda":
        batch = opts["batch_size"] or 2
    else:
        row.update(largest_batch(trainee, opts) if not compiled else {})
        batch = row.get("batch") or opts["_eager_batch"].get((objective, size, checkpointing)) or 64
    while True:
        try:
            timing = time_steps(trainee, batch, opts)
            break
        except Exception as err:  # noqa: BLE001
            if not is_oom(err) or batch <= 8:
                raise
        recover(trainee)
        row.setdefault("shrunk_from", []).append(batch)
        batch = max(8, int(batch * 0.85) // 8 * 8)
    if not compiled:
        opts["_eager_batch"][(objective, size, checkpointing)] = batch
    flops = trainee.task.flops(run_cfg.model, batch)  # the task's analytic FLOPs: MFU of what it computes
    row.update(batch=batch, step_s=round(timing["step_s"], 4), first_step_s=timing["first_step_s"],
               images_per_s=round(batch / timing["step_s"], 1),
               tflop_per_s=round(flops / timing["step_s"] / 1e12, 1),
               mfu=round(flops / timing["step_s"] / peak, 3))
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del trainee
    free(device)
    return row


def run(args: argparse.Namespace | None = None) -> dict:
    """All configurations within the time budget; images/s, TFLOP/s and MFU per configuration."""
    opts = {k: option(args, k, v) for k, v in DEFAULTS.items()}
    device = torch.device(opts["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU is present: the gpu suite has nothing to measure here (exit 0)")
        return {"gpu": None, "skipped": "no CUDA device", "summary": {"gpu_present": False}}
    if device.type == "cpu":  # the test mode: the same code on a tiny model
        opts["sizes"] = [s if s == "tiny" else "tiny" for s in opts["sizes"]][:1]
    start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    from pipeline.metrics import device_peak_flops

    dtype_peak = device_peak_flops(device, torch.bfloat16) if device.type == "cuda" else float("nan")
    if device.type != "cuda":
        opts["mm_size"] = 256
    mm = matmul_flops(torch.bfloat16, size=opts["mm_size"], repeats=10,
                      device=device.type)
    peak = dtype_peak if dtype_peak == dtype_peak else mm  # NaN (unknown GPU, or CPU): the measured matmul
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "peak_bf16_tflop_per_s": round(peak / 1e12, 1),
              "matmul_bf16_tflop_per_s": round(mm / 1e12, 1), "settings": {k: v for k, v in opts.items()},
              "rows": [], "skipped": []}
    log(f"{result['device']}: bf16 peak {result['peak_bf16_tflop_per_s']} TFLOP/s, "
        f"measured {opts['mm_size']}^3 matmul {result['matmul_bf16_tflop_per_s']} TFLOP/s")
    opts["_eager_batch"] = {}
    configurations = [(objective, size, checkpointing, compiled) for objective in opts["objectives"]
                      for size in opts["sizes"] for checkpointing in opts["checkpointing"]
                      for compiled in (c == "on" for c in opts["compile"])]
    for objective, size, checkpointing, compiled in configurations:
        name = f"{objective} {size} ckpt={checkpointing} compile={compiled}"
        if time.perf_counter() - start > opts["budget_s"]:
            result["skipped"].append(f"{name}: time budget")
            continue
        row = None
        try:
            row = run_config(size, checkpointing, compiled, opts, device, peak, objective)
        except Exception as err:  # noqa: BLE001 - one configuration's failure is a result, not the end
            result["skipped"].append(f"{name}: {type(err).__name__}: {str(err).strip()[:300]}")
            log(result["skipped"][-1])
        if row is None:
            free(device)  # here, not in the except block, whose traceback still holds the model
            continue
        row["matmul_fraction"] = round(row["tflop_per_s"] * 1e12 / mm, 3)
        result["rows"].append(row)
        log(str(row))
    result["settings"].pop("_eager_batch", None)
    best = {}
    for row in result["rows"]:  # keyed "L/16" for classification, "L/16 mae" for another objective
        key = row["size"] if row["objective"] == "classification" else f"{row['size']} {row['objective']}"
        if row["mfu"] > best.get(key, {}).get("mfu", -1):
            best[key] = row
    result["summary"] = {f"{size} best mfu": r["mfu"] for size, r in best.items()}
    result["summary"].update({f"{size} best config": f"ckpt={r['checkpointing']} compile={r['compile']} "
                              f"batch={r['batch']} {r['images_per_s']} img/s" for size, r in best.items()})
    if "L/16" in best:
        result["summary"]["goal_L16_mfu_ge_45pct_met"] = best["L/16"]["mfu"] >= 0.45
    result["summary"]["wall_s"] = round(time.perf_counter() - start, 1)
    return result
