"""Real 2-process training runs under torchrun (gloo, CPU): every ZeRO stage, fp32 and bf16.

The runs go through tests/integration/guarded_pretrain.py, which makes two CUDA-only faults visible on a
CPU: a host tensor handed to a collective of the device's group (NCCL refuses it), and a
host-device synchronisation in a steady-state step (one stalls the GPU's queue).
"""
from __future__ import annotations

import json
import subprocess
from collections import Counter
import sys
from pathlib import Path

import pytest

from conftest import (PRETRAIN, ROOT, TINY, WORKERS, first_train_shards, ledger, metrics, run_env, shard_overrides,
                      torchrun)
from guarded_pretrain import findings

GUARDED = Path(__file__).with_name("guarded_pretrain.py")


def guard_reports(out: Path) -> list[dict]:
    return [json.loads((out / f"guard_rank{rank}.json").read_text()) for rank in (0, 1)]


# DeepSpeed's own host reads per steady-state step (docs/PERFORMANCE.md), DeepSpeed 0.19.8, at
# the precision each stage runs with below: its gradient-norm checks (3 at ZeRO-1/2, 1 at ZeRO-3)
# and, in bf16 at ZeRO-1/2, the overflow flag's .item(); at ZeRO-0 the step is ours and
# DeepSpeed's engine, and none wait. (ZeRO-3 reads more in steps 1-2, while it sets itself up.)
DEEPSPEED_READS_PER_STEP = {0: 0, 1: 3, 2: 4, 3: 1}


def deepspeed_reads_per_step(report: dict, steps: range) -> int:
    """The most common count of DeepSpeed's host reads in the training part of ``steps``."""
    per_step = dict.fromkeys(steps, 0)
    for row in report["syncs"]:
        if row["phase"] == "step" and row["origin"].startswith("deepspeed") and row["step"] + 1 in per_step:
            per_step[row["step"] + 1] += row["count"]
    return Counter(per_step.values()).most_common(1)[0][0]


# The DeiT recipe's data pieces (RandAugment in the workers, repeated augmentation, erasing and
# mixup/cutmix on the device), riding on the ZeRO-2 bf16 run: the guard covers them too.
# RandAugment runs in the DataLoader workers: this run has one per rank (TINY has none).
# It trains two epochs of the first 3 training shards (600 samples: 10 steps of 2 x 30 each, none left
# out): one cycle of aug_repeats=2, which its ledger checks.
AUGMENTED_SHARDS, AUGMENTED_BATCH, AUGMENTED_STEPS = 3, 30, 20


def augmentations(shards: Path) -> list[str]:
    return [WORKERS, "data.auto_augment=rand-m9-mstd0.5-inc1", "data.aug_repeats=2", "data.reprob=0.25",
            "data.recount=2", "data.mixup=0.8", "data.cutmix=1.0", "data.mixup_mode=elem", "data.ledger=true",
            first_train_shards(shards, AUGMENTED_SHARDS), f"data.batch_size={AUGMENTED_BATCH}",
            f"train.max_steps={AUGMENTED_STEPS}"]


# Every stage and both precisions, each stage once: the other pairs run elsewhere with the same
# guard or the same engine (mae/simmim at bf16 ZeRO 0-3 in test_train_masked.py; fp32 ZeRO 0-3 in
# the checkpoint runs; bf16 ZeRO-2 in test_train_compile.py; bf16 ZeRO-3 in test_clean_exit.py).
@pytest.mark.parametrize("stage, precision, augmented", [(0, "bf16", False), (1, "fp32", False), (2, "bf16", True),
                                                         (3, "fp32", False)],
                         ids=["0-bf16", "1-fp32", "2-bf16-augmented", "3-fp32"])
def test_two_ranks_train_every_zero_stage(tmp_path, digits_shards, stage, precision, augmented):
    out = tmp_path / "run"
    extra = augmentations(digits_shards) if augmented else []
    steps = AUGMENTED_STEPS if augmented else 30
    # Rows every 5 steps, evaluation at 10, checkpoints at 15: steps in between are steady-state steps.
    # An EMA of the weights is on: its update runs in every steady-state step, under the guard.
    result = torchrun(2, [*TINY, *shard_overrides(digits_shards), f"train.output_dir={out}",
                          "train.ema_decay=0.95", "train.ema_warmup=true",
                          f"train.zero_stage={stage}", f"train.precision={precision}", "train.max_steps=30", "optim.lr=3e-3", "data.batch_size=32",
                          "model.activation_checkpointing=every-2", "train.log_every=5", "train.eval_every=10",
                          "checkpoint.every_steps=15", *extra], script=GUARDED)  # extra's shards, batch and steps come last
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "exit_status").read_text().strip() == "0"
    # every collective of the device's group got device tensors, and our code never waits for the
    # device in a steady-state step (at ZeRO-0 nobody's does after step 1); test_guard.py plants
    # faults to show that this check fails when it should
    assert findings(out, whole_step=stage == 0) == []
    for report in guard_reports(out):
        assert deepspeed_reads_per_step(report, range(3, steps + 1)) == DEEPSPEED_READS_PER_STEP[stage]
    train_rows, val_rows = metrics(out)
    assert [r["step"] for r in train_rows] == list(range(5, steps + 1, 5))
    losses = [r["loss"] for r in train_rows]
    if extra:  # mixed soft targets and heavy augmentation: 20 steps show no trend, only a sane loss
        assert all(0 < loss < 3 for loss in losses), losses
    else:
        assert losses[-1] < losses[0] - 0.03, losses  # means over steps 26-30 vs 1-5: a ViT leaves chance slowly
    assert val_rows and val_rows[-1]["val_samples"] > 0
    assert [r["step"] for r in val_rows] == list(range(10, steps + 1, 10)) and all(0 <= r["val_top1_ema"] <= 1 for r in val_rows)
    assert 0 < train_rows[-1]["samples_per_s"] and 0 <= train_rows[-1]["data_wait_fraction"] <= 1
    assert train_rows[-1]["mfu"] > 0 and train_rows[-1]["grad_norm"] > 0
    assert (out / "config.yaml").is_file() and any((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / f"step-{steps}" / "COMPLETE").is_file()
    if extra:  # DeiT's repeated augmentation over one cycle (2 epochs): 600 distinct samples (the
        # epoch's length in samples), each exactly twice, its two copies on the two ranks at one step
        copies = {}
        for rank in (0, 1):
            for line in ledger(out, rank):
                for key in line["keys"]:
                    copies.setdefault(key, []).append((rank, line["step"]))
        assert len(copies) == 600 and all(len(c) == 2 for c in copies.values())
        assert all({rank for rank, _ in c} == {0, 1} and c[0][1] == c[1][1] for c in copies.values())


def test_conflicting_deepspeed_key_is_refused_before_training(tmp_path, digits_shards):
    out = tmp_path / "run"
    result = torchrun(2, [*TINY, *shard_overrides(digits_shards), f"train.output_dir={out}", "train.zero_stage=2",
                          "deepspeed.zero_optimization={stage: 3}"], timeout=180)
    assert result.returncode != 0
    assert "deepspeed.zero_optimization.stage=3 conflicts with 2 derived from train.zero_stage" in result.stderr
    assert no_traceback_from_us(result.stderr)
    assert not (out / "checkpoints").exists()


def test_fp16_on_cpu_is_refused_in_one_line(tmp_path, digits_shards):
    command = [sys.executable, str(PRETRAIN), "--config", str(ROOT / "configs/digits_tiny.yaml"), *TINY,
               *shard_overrides(digits_shards), f"train.output_dir={tmp_path}", "train.precision=fp16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=run_env())
    assert result.returncode == 2
    assert "train.precision=fp16 needs a CUDA GPU" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def no_traceback_from_us(stderr: str) -> bool:
    """torchrun prints its own ChildFailedError traceback for any failing worker; ours must not."""
    return "/pipeline/" not in stderr and 'pretrain.py", line' not in stderr
