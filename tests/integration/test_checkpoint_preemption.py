"""SIGUSR1 (Slurm's warning before preemption) sent to the worker processes of a 2-rank torchrun job,
one rank a moment before the other, and once more while the stop checkpoint is being written:
every rank stops at the same step, saves, exits 75; the rerun continues without a gap or a repeat.
(The signals go to the workers, not torchrun: torchrun dies on SIGUSR1; slurm/torchrun_node.py relays.)"""
from __future__ import annotations

import re

import pytest

import checkpoint_runs as runs


@pytest.fixture(scope="module")
def pair(tmp_path_factory, digits_shards) -> runs.Pair:
    return runs.preempted_pair(tmp_path_factory.getbasetemp() / "checkpoint-runs", digits_shards, stage=2)


def test_every_rank_stops_at_the_same_step_saves_and_exits_75(pair):
    log, notes = pair.first.log, pair.notes
    assert pair.first.returncode == 1, log[-3000:]  # torchrun reports any failing worker as 1...
    assert notes["exit_status"] == "75"  # ...so rank 0 leaves the code that means "requeue me" here
    # torchrun's summary lists each worker's exit code: 75 both, none killed by its SIGTERM
    assert sorted(re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", log)) == ["75", "75"], log[-3000:]
    stops = re.findall(r"\[rank(\d)\] WARNING pipeline\.trainer: stopped by (SIGUSR1) at step (\d+)", log)
    assert sorted(rank for rank, _, _ in stops) == ["0", "1"]
    (step,) = {int(s) for _, _, s in stops}  # one step for all
    assert step >= notes["signalled_at"]
    assert notes["ledger_steps"] == [list(range(1, step + 1))] * 2
    assert notes["checkpoints"][-1] == f"step-{step}"


def test_a_second_signal_during_the_save_changes_nothing(pair):
    assert pair.notes["second_signal"] == "sent while saving"
    assert "received SIGUSR1 again while stopping (after SIGUSR1): ignored" in pair.first.log
    # the checkpoint it hit is complete and is the one the rerun loaded
    step = int(pair.notes["checkpoints"][-1].split("-")[1])
    assert f"resumed from {pair.interrupted}/checkpoints/step-{step} at step {step}" in pair.second.log


def test_the_rerun_finishes_with_every_step_once(pair):
    assert pair.second.returncode == 0, pair.second.log[-3000:]
    assert (pair.interrupted / "exit_status").read_text().strip() == "0"
    for rank in (0, 1):
        assert [line["step"] for line in runs.ledger_lines(pair.interrupted, rank)] == list(range(1, runs.STEPS + 1))
    logged = [step for step in range(1, runs.STEPS + 1) if step % 3 == 0 or step == runs.STEPS]  # SLOW_SAVE logs every 3
    assert sorted(runs.train_rows(pair.interrupted)) == logged
