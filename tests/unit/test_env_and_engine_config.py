"""The environment resolver and the DeepSpeed config we derive; one process started, to see what an
engine's set-up imports."""
import subprocess
import sys

import pytest

from conftest import ROOT, run_env
from pipeline.config import ConfigError, load_config
from pipeline.distributed.engine import build_deepspeed_config
from pipeline.distributed.precision import check_precision
from pipeline.distributed.env import DistributedEnvError, resolve_env

import torch

TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}


def test_torchrun_environment():
    env = resolve_env(TORCHRUN)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (1, 1, 4, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node7", 29400, "torchrun")


def test_partial_torchrun_environment_is_an_error():
    with pytest.raises(DistributedEnvError, match="MASTER_ADDR, MASTER_PORT missing"):
        resolve_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})


def test_slurm_without_torchrun():
    env = resolve_env({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
                       "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "gpu[003-004,010]"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert env.master_addr == "gpu003" and env.launcher == "slurm"


def test_single_process_fallback():
    env = resolve_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert env.master_port > 0


def cfg(*overrides):
    return load_config(None, ["data.train_shards=x.tar", *overrides])


def test_derived_deepspeed_config():
    ds = build_deepspeed_config(cfg("data.batch_size=8", "train.grad_accum_steps=3", "train.zero_stage=3",
                                    "train.precision=bf16", "optim.grad_clip=0.5"), world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["train_batch_size"] == 8 * 3 * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5


def test_zero3_reduce_bucket_default_is_40_mb_of_gradients_and_overridable():
    bucket = {precision: build_deepspeed_config(cfg("train.zero_stage=3", f"train.precision={precision}"),
                                                world_size=2)["zero_optimization"]
              for precision in ("fp32", "bf16", "fp16")}
    assert bucket == {"fp32": {"stage": 3, "reduce_bucket_size": 10_000_000},
                      "bf16": {"stage": 3, "reduce_bucket_size": 20_000_000},
                      "fp16": {"stage": 3, "reduce_bucket_size": 20_000_000}}
    ds = build_deepspeed_config(cfg("train.zero_stage=3", "deepspeed.zero_optimization={reduce_bucket_size: 500000000}"),
                                world_size=2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert "reduce_bucket_size" not in build_deepspeed_config(cfg("train.zero_stage=2"), 2)["zero_optimization"]


def test_bf16_at_zero0_uses_autocast_not_deepspeed_bf16():
    ds = build_deepspeed_config(cfg("train.zero_stage=0", "train.precision=bf16"), world_size=1)
    assert not ds["bf16"]["enabled"]


def test_native_keys_pass_through_and_agreeing_keys_are_fine():
    ds = build_deepspeed_config(cfg("train.zero_stage=2", "deepspeed.zero_optimization={stage: 2, overlap_comm: true}",
                                    "deepspeed.zero_allow_untested_optimizer=true"), world_size=1)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["zero_allow_untested_optimizer"] is True


@pytest.mark.parametrize("override, fragment", [
    ("deepspeed.zero_optimization={stage: 3}", "deepspeed.zero_optimization.stage=3 conflicts with 2 derived from train.zero_stage"),
    ("deepspeed.train_micro_batch_size_per_gpu=64", "derived from data.batch_size"),
    ("deepspeed.bf16={enabled: false}", "derived from train.precision"),
    ("deepspeed.scheduler={type: WarmupLR}", "deepspeed.scheduler is not allowed"),
])
def test_conflicting_native_keys_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        build_deepspeed_config(cfg("train.zero_stage=2", "train.precision=bf16", override), world_size=1)


def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA GPU"):
        check_precision("fp16", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))


ENGINE_SET_UP_IMPORTS = """
import sys, torch
from pipeline.distributed.engine import _import_deepspeed_muon_eagerly
from launch.benchmarks import training_steps
muon = "deepspeed.runtime.zero.muon.original_muon"
_import_deepspeed_muon_eagerly({"optimizer": {"type": "Muon", "params": {}}})
print("native Muon leaves it alone:", muon not in sys.modules)
compile_ = torch.compile
training_steps.single_process_group()
cfg = training_steps.train_config("tiny", batch_size=2, precision="bf16", zero_stage=2)
images, labels = training_steps.synthetic_batch(cfg)
step, engine = training_steps.engine_step(cfg, training_steps.build_seeded_model(cfg), images, labels)
step()
print("inductor imported:", "torch._inductor.compile_fx" in sys.modules)
print("torch.compile restored:", torch.compile is compile_)
print("Muon kernels compiled:", hasattr(sys.modules[muon].muon_update, "_torchdynamo_orig_callable"))
"""


def test_a_zero_engine_set_up_imports_no_inductor_and_leaves_torch_compile_as_it_was():
    """DeepSpeed imports its Muon module at every ZeRO optimizer's set-up, and that module's
    torch.compile decorators import TorchInductor (~1.3 s of CPU per rank at every start); the
    engine imports it first with its kernels eager, unless the deepspeed: section asks for Muon."""
    done = subprocess.run([sys.executable, "-c", ENGINE_SET_UP_IMPORTS], capture_output=True, text=True, env=run_env(),
                          cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-4:] == ["native Muon leaves it alone: True", "inductor imported: False",
                                             "torch.compile restored: True", "Muon kernels compiled: False"]
