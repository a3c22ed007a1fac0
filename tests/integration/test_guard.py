"""The guard of guarded_pretrain.py catches what it claims to: each fault of planted_faults.py,
planted into the pipeline's own code in the guarded child processes only, makes a 2-rank
guarded run fail, with the check that every clean guarded run passes (``findings``).

The runs are the smallest that reach each fault: ZeRO-0 (where the step computes the gradient
norm), 2 steps (step 1 is a steady-state step, step 2 logs), no DataLoader workers, and no
validation set except for the fault in the evaluation.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY, run_env, shard_overrides, torchrun
from guarded_pretrain import findings
from planted_faults import where

GUARDED = Path(__file__).with_name("guarded_pretrain.py")
SMALLEST = [*TINY, "data.num_workers=0", "train.zero_stage=0", "train.precision=bf16", "train.max_steps=2",
            "train.log_every=2"]

# plant -> (what the run's own exit says, what the guard's findings say)
CAUGHT = {
    "float_in_add_loss": (0, f"__float__ at {where('float_in_add_loss')} in step 1"),
    "host_read_in_step": (0, f"__bool__ at {where('host_read_in_step')} in step 1"),
    "window_without_device": (1, "refused all_reduce: a host tensor"),
    "eval_sums_without_device": (1, "refused all_reduce: a host tensor"),
}


@pytest.mark.parametrize("fault", list(CAUGHT))
def test_a_planted_fault_fails_the_guarded_run(tmp_path, digits_shards, fault):
    out = tmp_path / "run"
    train, val = shard_overrides(digits_shards)
    data = [train, val if fault == "eval_sums_without_device" else "data.val_shards=null"]
    result = torchrun(2, [*SMALLEST, *data, f"train.output_dir={out}"], script=GUARDED, timeout=300,
                      env={**run_env(), "GUARD_PLANT": fault})
    code, line = CAUGHT[fault]
    assert (out / "exit_status").read_text().strip() == str(code), result.stderr[-3000:]
    found = findings(out)
    assert any(line in f for f in found), found
    if code:  # the refused collective is where the run ended: the trainer's code, named in the log
        assert "guard: all_reduce got a host tensor on the trainer's device group" in result.stderr
