"""The sbatch scripts on a real two-node Slurm cluster (slurm/local/, started by the fixture).

The trainer here is tests/slurm_fake_trainer.py: it keeps launch/pretrain.py's contract with the
scripts (environment, ledger, checkpoint on SIGUSR1/SIGTERM then exit 75, resume) in a few
seconds. Set SLURM_TEST_TRAIN_SCRIPT to run these jobs with another entry point.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

TRAIN_SCRIPT = os.environ.get("SLURM_TEST_TRAIN_SCRIPT", "tests/slurm_fake_trainer.py")
PREEMPTED = 75


def job_env(run_dir: Path) -> dict:
    return {"RUN_DIR": str(run_dir), "TRAIN_SCRIPT": TRAIN_SCRIPT, "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1"}


def write_config(tmp_path: Path, max_steps: int, step_seconds: float) -> Path:
    config = tmp_path / "fake.yaml"
    config.write_text(f"train.max_steps: {max_steps}\nfake.step_seconds: {step_seconds}\n")
    return config


def ledgers(run_dir: Path) -> dict[int, list[dict]]:
    """{rank: the steps it recorded, in order}."""
    return {int(p.stem.removeprefix("rank")): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((run_dir / "ledger").glob("rank*.jsonl"))}


def steps_done(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text())["steps_done"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_steps(cluster: SlurmCluster, job_id: int, run_dir: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while steps_done(run_dir) < n:
        info = cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), cluster.output(info)
        assert time.monotonic() < deadline, f"fewer than {n} steps in {timeout}s\n{cluster.output(info)}"
        time.sleep(0.3)


def assert_each_step_once(run_dir: Path, max_steps: int, world_size: int) -> dict[int, list[dict]]:
    rows = ledgers(run_dir)
    assert sorted(rows) == list(range(world_size))
    for rank, steps in rows.items():
        assert [r["step"] for r in steps] == list(range(max_steps)), f"rank {rank}: a step twice or skipped"
        assert {r["world_size"] for r in steps} == {world_size}
    return rows


@pytest.mark.timeout(60)
def test_cluster_has_two_nodes(slurm_cluster):
    if slurm_cluster.start_seconds is not None:
        print(f"local Slurm cluster started in {slurm_cluster.start_seconds:.1f}s")
    out = slurm_cluster.run("srun", "-N2", "-l", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME",
                            cwd="/tmp").stdout
    tasks = sorted(line.split(":", 1)[1].split() for line in out.strip().splitlines())
    assert tasks == [["0", "n1"], ["1", "n2"]]


@pytest.mark.timeout(90)
def test_two_node_torchrun_job_runs_to_the_end(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, max_steps=6, step_seconds=0.2)
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", str(config), env=job_env(run_dir),
                               sbatch_args=("--nodes=2", f"--output={tmp_path}/slurm-%j.out"))
    info = slurm_cluster.wait_finished(job, timeout=75)
    out = slurm_cluster.output(info)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", out
    rows = assert_each_step_once(run_dir, max_steps=6, world_size=2)
    assert {steps[0]["node"] for steps in rows.values()} == {"n1", "n2"}  # one rank on each node
    assert (run_dir / "done.json").is_file()
    assert (run_dir / "slurm.out").resolve() == Path(info["StdOut"])
    assert "rendezvous=n1:" in out and "procs/node=1" in out


@pytest.mark.timeout(120)
def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, max_steps=14, step_seconds=0.3)
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", str(config), env=job_env(run_dir),
                               sbatch_args=("--nodes=2", f"--output={tmp_path}/slurm-%j.out"))
    wait_steps(slurm_cluster, job, run_dir, 3, timeout=60)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@N does
    info = slurm_cluster.wait_finished(job, timeout=90)
    out = slurm_cluster.output(info)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    assert "exited 75: requeueing" in out
    rows = assert_each_step_once(run_dir, max_steps=14, world_size=2)
    # The first run stopped after a few steps, the requeued run (same job id) did the rest.
    for steps in rows.values():
        first = [r["step"] for r in steps if r["restart"] == 0]
        assert 3 <= len(first) < 14
        assert {r["job"] for r in steps} == {str(job)}
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step_{len(first)}.json"]


@pytest.mark.timeout(60)
def test_bad_config_fails_without_requeue(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, max_steps=4, step_seconds=0.1)
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", str(config), "no_such.key=1", env=job_env(run_dir),
                               sbatch_args=("--nodes=2", f"--output={tmp_path}/slurm-%j.out"))
    info = slurm_cluster.wait_finished(job, timeout=45)
    out = slurm_cluster.output(info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", out
    assert "exit code 2: not requeueing" in out
    time.sleep(3)  # a requeue would show up as PENDING again
    info = slurm_cluster.job(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    assert out.count("[job ") == out.count("restart 0]")  # one run only


@pytest.mark.timeout(120)
def test_srun_variant_holds_an_early_signal_then_requeues(slurm_cluster, tmp_path):
    """One task per process with srun (no torchrun): SLURM_PROCID and MASTER_ADDR/PORT from the script.

    The signal comes as soon as the step starts, before the trainer has its handlers: the batch
    shell holds it for STEP_SIGNAL_GRACE seconds rather than kill the trainer with it.
    """
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, max_steps=10, step_seconds=0.3)
    job = slurm_cluster.sbatch("slurm/pretrain_srun.sbatch", str(config), env=job_env(run_dir),
                               sbatch_args=("--nodes=2", "--ntasks-per-node=1",
                                            f"--output={tmp_path}/slurm-%j.out"))
    slurm_cluster.wait_job(job, lambda j: "train: " in slurm_cluster.output(j), timeout=60, what="start")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = slurm_cluster.wait_finished(job, timeout=90)
    out = slurm_cluster.output(info)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    rows = assert_each_step_once(run_dir, max_steps=10, world_size=2)
    assert {rank: steps[0]["node"] for rank, steps in rows.items()} == {0: "n1", 1: "n2"}  # SLURM_PROCID order


@pytest.mark.timeout(90)
def test_time_limit_warning_signal_requeues(slurm_cluster, tmp_path):
    """--signal=B:USR1@55 with a 1-minute limit: Slurm itself warns the batch shell (within ~30 s)."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, max_steps=1000, step_seconds=0.3)
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", str(config), env=job_env(run_dir),
                               sbatch_args=("--nodes=1", "--time=1", "--signal=B:USR1@55",
                                            f"--output={tmp_path}/slurm-%j.out"))
    try:
        info = slurm_cluster.wait_job(job, lambda j: j.get("Restarts") == "1", timeout=75, what="requeue")
    finally:
        slurm_cluster.run("scancel", str(job), check=False)
    out = slurm_cluster.output(info)
    assert "got SIGUSR1" in out and "exited 75: requeueing" in out
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    steps = [r["step"] for r in ledgers(run_dir)[0] if r["restart"] == 0]
    assert steps == list(range(len(steps))) and checkpoint.name == f"step_{len(steps)}.json"


@pytest.mark.timeout(90)
def test_cancel_checkpoints_and_is_not_requeued(slurm_cluster, tmp_path):
    """scancel sends SIGTERM: the trainer still checkpoints and exits 75, but a cancelled job stays cancelled."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, max_steps=1000, step_seconds=0.3)
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", str(config), env=job_env(run_dir),
                               sbatch_args=("--nodes=2", f"--output={tmp_path}/slurm-%j.out"))
    wait_steps(slurm_cluster, job, run_dir, 2, timeout=60)
    slurm_cluster.run("scancel", str(job))
    info = slurm_cluster.wait_finished(job, timeout=60)
    out = slurm_cluster.output(info)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", out
    assert "not requeueing" in out
    assert len(list((run_dir / "checkpoints").iterdir())) == 1
