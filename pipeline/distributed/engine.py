"""DeepSpeed from our config: the process group, the engine's JSON config, and the engine.

The values we derive from the typed config (batch sizes, ZeRO stage, precision, clipping) may
also be given in the native ``deepspeed:`` section, but must then agree: a silent override
of, say, the ZeRO stage is how a run ends up measuring something else than it says.
"""
from __future__ import annotations

import copy
import datetime
import importlib
import logging
import sys
import warnings
from typing import Any

import torch

from pipeline.config import Config, ConfigError
from pipeline.distributed.env import DistributedEnv
from pipeline.distributed.precision import deepspeed_precision, uses_autocast
from pipeline.distributed.zero3_master import shared_fp32_master
from pipeline.optim import build_optimizer, build_scheduler, optimizer_groups

log = logging.getLogger(__name__)

# torch 2.14 warns at every ZeRO step that the collectives DeepSpeed calls are deprecated: noise to users.
for _name in ("all_gather_into_tensor", "reduce_scatter_tensor", "_all_gather_base", "_reduce_scatter_base"):
    warnings.filterwarnings("ignore", message=f".*{_name}.*is deprecated.*", category=FutureWarning)

STEPS_PER_PRINT_NEVER = 2**31 - 1


def device_for(env: DistributedEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def derived_deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed keys that our typed config decides."""
    # Where the train step clips (ZeRO-0 outside fp16, see train_step.py), DeepSpeed must not clip again.
    clipping = 0.0 if step_clips_gradients(cfg.train) else cfg.optim.grad_clip
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps * world_size,
        "gradient_clipping": clipping,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        **deepspeed_precision(cfg.train),
    }


def step_clips_gradients(train) -> bool:
    """ZeRO-0 with a client optimizer and no loss scaler: DeepSpeed would neither skip a non-finite
    step nor clip without a host round trip, so the train step does both on the device."""
    return train.zero_stage == 0 and train.precision != "fp16"


# Where a conflicting native key should be changed instead.
OWNER_OF = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "data.batch_size x train.grad_accum_steps x world size",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
}
# Our optim section owns the schedule; a second scheduler would fight it.
REFUSED_KEYS = {"scheduler": "optim.warmup_steps / optim.schedule / optim.lr"}
DEFAULTS = {"steps_per_print": STEPS_PER_PRINT_NEVER, "wall_clock_breakdown": False,
            "fp16": {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}}


def merge_deepspeed_config(derived: dict, user: dict, prefix: str = "") -> dict:
    """User's native keys merged over ours; a leaf both set to different values is refused."""
    merged = copy.deepcopy(derived)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in REFUSED_KEYS:
            raise ConfigError(f"deepspeed.{key} is not allowed: the schedule comes from "
                              f"{REFUSED_KEYS[key]}; remove deepspeed.{key}")
        if key not in merged:
            merged[key] = copy.deepcopy(value)
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = merge_deepspeed_config(merged[key], value, prefix=f"{dotted}.")
        elif merged[key] != value:
            owner = OWNER_OF.get(dotted, "the typed config")
            raise ConfigError(f"deepspeed.{dotted}={value!r} conflicts with {merged[key]!r} derived from "
                              f"{owner}; set it there and remove deepspeed.{dotted}")
    return merged


# ZeRO-3's reduce bucket, a default users may override. DeepSpeed's is 5e8 elements, a buffer as
# large as a ViT-B's weights; 40 MB of gradients (2e7 elements in bf16/fp16, 1e7 in fp32) is still
# one large reduce-scatter (docs/DECISIONS.md, ZeRO-3 memory).
ZERO3_REDUCE_BUCKET_BYTES = 40_000_000


def zero3_defaults(precision: str) -> dict[str, Any]:
    gradient_bytes = 4 if precision == "fp32" else 2
    return {"reduce_bucket_size": ZERO3_REDUCE_BUCKET_BYTES // gradient_bytes}


def build_deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    merged = merge_deepspeed_config(derived_deepspeed_config(cfg, world_size), cfg.deepspeed)
    for key, value in DEFAULTS.items():
        if isinstance(value, dict):
            merged[key] = {**value, **merged.get(key, {})}
        else:
            merged.setdefault(key, value)
    zero = merged.get("zero_optimization", {})
    if zero.get("stage") == 3:
        merged["zero_optimization"] = {**zero3_defaults(cfg.train.precision), **zero}
    return merged


def init_process_group(env: DistributedEnv, timeout_s: float) -> None:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA)."""
    import deepspeed
    import deepspeed.ops

    env.export()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    # DeepSpeed's shared-memory all-reduce serves inference only; building it costs ~30 s on a
    # fresh machine and it holds shared memory across ranks at teardown. Training never uses it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), verbose=False)


def destroy_process_group(*, clean: bool) -> None:
    """Tear the process group down in step: everyone arrives, then everyone leaves.

    After a failure the other ranks may sit in a different collective, so a barrier there
    would wait out the whole timeout: then we only destroy our end.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


# DeepSpeed (0.19.8) imports its Muon optimizer at every ZeRO (and bf16) optimizer's set-up, for an
# isinstance check; that module decorates its kernels with torch.compile at import time, which
# imports TorchInductor: 1.3 s more CPU per rank at every start, for an optimizer this pipeline
# does not use unless the ``deepspeed:`` section asks for it (a 4-step one-rank ZeRO-2 run on the
# 2-core VM: 9.07 s of CPU against 7.75 s with the module imported as below; docs/DECISIONS.md).
_DEEPSPEED_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def _import_deepspeed_muon_eagerly(ds_config: dict[str, Any]) -> None:
    """Import DeepSpeed's Muon module with its kernels left eager (not compiled), so that ZeRO's
    set-up finds it imported; nothing when a native Muon optimizer is configured (it then keeps
    its compiled kernels) or the module is there already. ``train.compile`` is unaffected: our
    layers are compiled later, with the real ``torch.compile``."""
    if "muon" in str(ds_config.get("optimizer", {}).get("type", "")).lower() or _DEEPSPEED_MUON in sys.modules:
        return
    compile_ = torch.compile

    def eager(model=None, **_options):  # torch.compile's two forms: compile(fn) and @compile(...)
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager
    try:
        importlib.import_module(_DEEPSPEED_MUON)
    except ImportError:  # a DeepSpeed without Muon: nothing to avoid
        pass
    finally:
        torch.compile = compile_


def _initialize(model: torch.nn.Module, cfg: Config, ds_config: dict[str, Any]) -> Any:
    import deepspeed

    _import_deepspeed_muon_eagerly(ds_config)

    def scheduler(optimizer):
        return build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)

    if "optimizer" in ds_config:
        # A native DeepSpeed optimizer (e.g. for ZeRO-Offload's CPUAdam): give it our groups.
        engine, *_ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model, cfg.optim),
                                          lr_scheduler=scheduler, config=ds_config)
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim),
                                          lr_scheduler=scheduler, config=ds_config)
    return engine


def build_engine(model: torch.nn.Module, cfg: Config, *, world_size: int) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with our AdamW and LR schedule. ``cfg`` has its run
    length and LR resolved (``optim.resolve_schedule``: epochs to steps, blr to lr)."""
    if cfg.train.max_steps is None or cfg.optim.lr is None:
        raise ValueError("build_engine needs a resolved schedule; call pipeline.optim.resolve_schedule first")
    ds_config = build_deepspeed_config(cfg, world_size)
    with shared_fp32_master():  # ZeRO-3 with fp32 weights: no second fp32 copy of them
        engine = _initialize(model, cfg, ds_config)
    if cfg.train.zero_stage == 0 and engine.dp_world_size == 1:
        # One data-parallel rank: DeepSpeed would flatten every gradient, all-reduce it with itself
        # and copy it back, for the same gradients (docs/DECISIONS.md, Step overhead).
        # ZeRO 1-3 need their reduce: it moves the gradients into the optimizer's partitions.
        engine.enable_backward_allreduce = False
    log.info("DeepSpeed engine: ZeRO-%d, precision %s%s, micro-batch %d, grad accumulation %d, world size %d",
             cfg.train.zero_stage, cfg.train.precision, " (autocast, fp32 weights)" if uses_autocast(cfg.train) else "",
             cfg.data.batch_size, cfg.train.grad_accum_steps, world_size)
    return engine
