"""The guard of guarded_pretrain.py catches what it claims to: each fault of planted_faults.py,
planted into the pipeline's own code in the guarded child processes only, makes a 2-rank
guarded run fail, with the check that every clean guarded run passes (``findings``).

The runs are the smallest that reach each fault: ZeRO-0 (where the step computes the gradient
norm), 2 steps (step 1 is a steady-state step, step 2 logs), no DataLoader workers, and no
validation set except for the fault in the evaluation.
"""
from __future__ import annotations

import json
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
# Faults that cannot hide one another share a run (a launch is ~10 s): the two host reads are
# counted in step 1 and named by their lines, and the evaluation's refused all-reduce comes after
# them, at the end. The window made on the host would untag the sums the first read reads: alone.
RUNS = {"host_reads_and_eval_sums": ["float_in_add_loss", "host_read_in_step", "eval_sums_without_device"],
        "window_without_device": ["window_without_device"]}


@pytest.mark.parametrize("plants", list(RUNS.values()), ids=list(RUNS))
def test_planted_faults_fail_the_guarded_run(tmp_path, digits_shards, plants):
    out = tmp_path / "run"
    train, val = shard_overrides(digits_shards)
    data = [train, val if "eval_sums_without_device" in plants else "data.val_shards=null"]
    result = torchrun(2, [*SMALLEST, *data, f"train.output_dir={out}"], script=GUARDED, timeout=300,
                      env={**run_env(), "GUARD_PLANT": ",".join(plants)})
    code = max(CAUGHT[plant][0] for plant in plants)
    assert (out / "exit_status").read_text().strip() == str(code), result.stderr[-3000:]
    found = findings(out)
    for plant in plants:
        assert any(CAUGHT[plant][1] in f for f in found), (plant, found)
    if code:  # the refused collective is where the run ended: the trainer's code, named in the log
        assert "guard: all_reduce got a host tensor on the trainer's device group" in result.stderr
    if "eval_sums_without_device" in plants:  # refused in the evaluation's own all-reduce, not in a step
        refused = [json.loads((out / f"guard_rank{rank}.json").read_text())["refused"] for rank in (0, 1)]
        assert all(where and all("pipeline/evaluation.py" in r and "in _evaluate" in r for r in where)
                   for where in refused), refused


def test_every_planted_fault_is_in_a_run():
    assert sorted(plant for plants in RUNS.values() for plant in plants) == sorted(CAUGHT)
