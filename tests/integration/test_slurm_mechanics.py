"""Signal timing in the sbatch scripts, on the real two-node Slurm cluster, with a stand-in trainer.

tests/integration/slurm_fake_trainer.py keeps launch/pretrain.py's contract with the scripts (environment,
checkpoint on SIGUSR1/SIGTERM then exit 75, resume) and starts in a second, which is what these
cases need: a signal that comes before the trainer can catch it, and Slurm's own time-limit
warning. What the real trainer does under Slurm is in test_slurm.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

FAKE_TRAINER = "tests/integration/slurm_fake_trainer.py"


def job_env(run_dir: Path, **extra: str) -> dict:
    return {"RUN_DIR": str(run_dir), "TRAIN_SCRIPT": FAKE_TRAINER, "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", **extra}


def write_config(tmp_path: Path, max_steps: int, step_seconds: float) -> Path:
    config = tmp_path / "fake.yaml"
    config.write_text(f"train.max_steps: {max_steps}\nfake.step_seconds: {step_seconds}\n")
    return config


def ledgers(run_dir: Path) -> dict[int, list[dict]]:
    """{rank: the steps it recorded, in order} (the fake trainer counts steps from 0)."""
    return {int(p.stem.removeprefix("rank")): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((run_dir / "ledger").glob("rank*.jsonl"))}


@pytest.mark.timeout(120)
def test_srun_variant_holds_a_signal_that_comes_before_the_trainer_catches_it(slurm_cluster, tmp_path):
    """In the srun variant the trainer gets the signal directly, and dies of one that comes before
    its handler is in. Here the trainer takes 2 s to install it (FAKE_TRAINER_STARTUP_S) and the
    signal comes as soon as the step starts: the batch shell holds it for STEP_SIGNAL_GRACE seconds
    (6 here, to keep the test short; 30 by default), then the trainer checkpoints and the job requeues."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, max_steps=40, step_seconds=0.3)
    env = job_env(run_dir, STEP_SIGNAL_GRACE="6", FAKE_TRAINER_STARTUP_S="2")
    job = slurm_cluster.sbatch("slurm/pretrain_srun.sbatch", str(config), env=env,
                               sbatch_args=("--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/slurm-%j.out"))
    slurm_cluster.wait_job(job, lambda j: "train: " in slurm_cluster.output(j), timeout=60, what="start",
                           poll=0.1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    try:
        info = slurm_cluster.wait_job(job, lambda j: j.get("Restarts") == "1", timeout=90, what="requeue")
    finally:
        slurm_cluster.run("scancel", str(job), check=False)  # the requeued run is not what this is about
    out = slurm_cluster.output(info)
    assert "got SIGUSR1" in out and "exited 75: requeueing" in out, out
    rows = ledgers(run_dir)
    assert sorted(rows) == [0, 1]
    for steps in rows.values():  # the first run trained a few steps, then both ranks stopped together
        first = [r["step"] for r in steps if r["restart"] == 0]
        assert first == list(range(len(first))) and 1 <= len(first) < 40
    assert {rank: steps[0]["node"] for rank, steps in rows.items()} == {0: "n1", 1: "n2"}


@pytest.mark.timeout(120)
def test_time_limit_warning_signal_requeues(slurm_cluster, tmp_path):
    """--signal=B:USR1@55 with a 1-minute limit: Slurm itself warns the batch shell (within ~30 s)."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, max_steps=1000, step_seconds=0.3)
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", str(config), env=job_env(run_dir, STEP_SIGNAL_GRACE="5"),
                               sbatch_args=("--nodes=1", "--time=1", "--signal=B:USR1@55",
                                            f"--output={tmp_path}/slurm-%j.out"))
    try:
        info = slurm_cluster.wait_job(job, lambda j: j.get("Restarts") == "1", timeout=100, what="requeue")
    finally:
        slurm_cluster.run("scancel", str(job), check=False)
    out = slurm_cluster.output(info)
    assert "got SIGUSR1" in out and "exited 75: requeueing" in out
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    steps = [r["step"] for r in ledgers(run_dir)[0] if r["restart"] == 0]
    assert steps == list(range(len(steps))) and checkpoint.name == f"step_{len(steps)}.json"
