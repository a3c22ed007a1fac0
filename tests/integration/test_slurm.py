"""The sbatch scripts with the real trainer on a real two-node Slurm cluster (slurm/local/).

Every job here runs launch/pretrain.py as a user would submit it: the tiny ViT (2 layers) on the
digits shards, one rank per node (n1, n2), gloo on CPU, the sample ledger on. What the issue asks:
a job trains to the end on both nodes; USR1 mid-run checkpoints, requeues, and the requeued job
finishes from that checkpoint with every step trained once; a real error (a bad config) fails
the job with exit 2 and no requeue. Also the srun-per-task variant, and scancel.
Signal timing edge cases, which need a trainer that starts in a second, are in test_slurm_mechanics.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, TINY_DECODER, WORKERS, first_train_shards, ledger, metrics, shard_overrides
from slurm_cluster import FINISHED, REPO, SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

CONFIG = "configs/digits_tiny.yaml"


def train_args(shards: Path, max_steps: int, *extra: str) -> list[str]:
    return [*TINY, WORKERS, *shard_overrides(shards), "data.ledger=true", f"train.max_steps={max_steps}", *extra]


def job_env(**extra: str) -> dict:
    # PIPELINE_DIST_TIMEOUT_S: a dead peer would otherwise hold the other rank for 30 minutes.
    # STEP_SIGNAL_GRACE: the signals here come once training runs, so the batch shell need not
    # hold them for the default 30 s (in case the trainer is still starting).
    return {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PIPELINE_DIST_TIMEOUT_S": "120",
            "STEP_SIGNAL_GRACE": "5", **extra}


class Watch:
    """Follows a job: how far rank 0 has trained (its ledger), and which node runs each rank.

    ``rank_var`` is the variable that holds a training process's rank: RANK under torchrun,
    SLURM_PROCID when srun starts the trainer itself.
    """

    def __init__(self, cluster: SlurmCluster, job: int, run_dir: Path, rank_var: str = "RANK"):
        self.cluster, self.job, self.run_dir, self.rank_var = cluster, job, run_dir, rank_var
        self.nodes: dict[int, str] = {}

    def steps(self) -> int:
        try:
            return len((self.run_dir / "ledger" / "rank0.jsonl").read_text().splitlines())
        except OSError:
            return 0

    def _poll(self) -> dict:
        for env in self.cluster.processes(self.job, "launch/pretrain.py"):
            if self.rank_var in env:
                self.nodes[int(env[self.rank_var])] = env.get("SLURMD_NODENAME", "?")
        return self.cluster.job(self.job)

    def until_steps(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.steps() < n:
            info = self._poll()
            assert info["JobState"] in ("PENDING", "RUNNING"), self.cluster.output(info)
            assert time.monotonic() < deadline, f"fewer than {n} steps in {timeout}s\n{self.cluster.output(info)}"
            time.sleep(0.3)

    def until_finished(self, timeout: float) -> tuple[dict, str]:
        """The job's final ``scontrol show job`` and its whole output file."""
        deadline = time.monotonic() + timeout
        while (info := self._poll())["JobState"] not in FINISHED:
            assert time.monotonic() < deadline, f"job {self.job} still {info['JobState']} after {timeout}s\n" \
                                                f"{self.cluster.output(info)}"
            time.sleep(0.3)
        return info, self.cluster.output(info, tail=1_000_000)


def assert_each_step_once(run_dir: Path, max_steps: int) -> None:
    """The ledgers of both ranks and metrics.jsonl hold steps 1..max_steps, each once, and no
    sample comes twice within an epoch. (After a resume both files keep only the steps up to the
    checkpoint: that a step was not trained twice shows in what the interrupted run left, below.)"""
    assert sorted(p.name for p in (run_dir / "ledger").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    rows = {rank: ledger(run_dir, rank) for rank in (0, 1)}
    for rank, lines in rows.items():
        assert [r["step"] for r in lines] == list(range(1, max_steps + 1)), f"rank {rank}: a step twice or skipped"
    train_rows, val_rows = metrics(run_dir)
    assert [r["step"] for r in train_rows] == list(range(1, max_steps + 1))
    assert val_rows and val_rows[-1]["step"] == max_steps
    by_epoch: dict[int, list[str]] = {}
    for row in train_rows:
        for rank in (0, 1):
            by_epoch.setdefault(row["epoch"], []).extend(rows[rank][row["step"] - 1]["keys"])
    for epoch, keys in by_epoch.items():
        assert len(set(keys)) == len(keys), f"epoch {epoch}: a sample trained twice"


def assert_checkpoints(run_dir: Path, steps: list[int]) -> None:
    root = run_dir / "checkpoints"
    tags = sorted((p.name for p in root.glob("step-*")), key=lambda t: int(t.split("-")[1]))
    assert tags == [f"step-{s}" for s in steps]
    assert all((root / tag / "COMPLETE").is_file() for tag in tags)
    assert (root / "latest").read_text().strip() == f"step-{steps[-1]}"


def stop_step(out: str, signal_name: str) -> int:
    """The step at which the trainer stopped for ``signal_name`` (the same on every rank)."""
    steps = {int(s) for s in re.findall(rf"stopped by (?:{signal_name}|a signal on another rank) at step (\d+)", out)}
    assert len(steps) == 1, out
    return steps.pop()


@pytest.mark.timeout(60)
def test_cluster_has_two_nodes(slurm_cluster):
    if slurm_cluster.start_seconds is not None:
        print(f"local Slurm cluster started in {slurm_cluster.start_seconds:.1f}s")
    out = slurm_cluster.run("srun", "-N2", "-l", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME",
                            cwd="/tmp").stdout
    tasks = sorted(line.split(":", 1)[1].split() for line in out.strip().splitlines())
    assert tasks == [["0", "n1"], ["1", "n2"]]


@pytest.mark.timeout(300)
def test_usr1_checkpoints_requeues_and_resumes_from_that_checkpoint(slurm_cluster, digits_shards):
    """`sbatch --nodes=2 slurm/pretrain.sbatch CONFIG k=v ...` with the defaults a user gets (the run
    directory runs/<job name>-<job id>/, the output file slurm-<job name>-<job id>.out), one rank per
    node; Slurm's warning (USR1) mid-run, the requeue, and the requeued job trains to the end."""
    # More than one epoch of the first 2 training shards (400 samples: 12 steps of 2 x 16): the data
    # stream resumes across one.
    name, max_steps = "test-slurm-e2e", 20
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", CONFIG,
                               *train_args(digits_shards, max_steps, first_train_shards(digits_shards, 2)),
                               env=job_env(), sbatch_args=("--nodes=2", f"--job-name={name}"))
    run_dir = REPO / "runs" / f"{name}-{job}"
    output = REPO / f"slurm-{name}-{job}.out"
    try:
        watch = Watch(slurm_cluster, job, run_dir)
        watch.until_steps(2, timeout=150)
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@N does
        # What the first run left, read while the requeued job waits to start (5 s at least).
        slurm_cluster.wait_job(job, lambda j: j.get("Restarts") == "1", timeout=120, what="requeue", poll=0.2)
        first = {rank: (run_dir / "ledger" / f"rank{rank}.jsonl").read_text().splitlines() for rank in (0, 1)}
        info, out = watch.until_finished(timeout=240)
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
        assert Path(info["StdOut"]) == output and (run_dir / "slurm.out").resolve() == output
        assert "procs/node=1 rendezvous=n1:" in out
        assert sorted(watch.nodes) == [0, 1] and sorted(watch.nodes.values()) == ["n1", "n2"], watch.nodes
        assert "got SIGUSR1" in out and "exited 75: requeueing" in out
        stopped = stop_step(out, "SIGUSR1")
        assert 2 <= stopped < max_steps, out
        # The first run trained up to the step it saved and no further, and the requeued run (same job
        # id, same run directory) started from that checkpoint: no step trained twice, none skipped.
        resumed = re.findall(r"resumed from (\S+) at step (\d+)", out)
        assert resumed == [(str(run_dir / "checkpoints" / f"step-{stopped}"), str(stopped))], out
        for rank in (0, 1):
            assert [json.loads(line)["step"] for line in first[rank]] == list(range(1, stopped + 1))
            assert (run_dir / "ledger" / f"rank{rank}.jsonl").read_text().splitlines()[:stopped] == first[rank]
        assert out.count("restart 1] training finished") == 1
        assert_each_step_once(run_dir, max_steps)
        assert_checkpoints(run_dir, [stopped, max_steps])
        assert (run_dir / "config.yaml").is_file() and (run_dir / "exit_status").read_text().strip() == "0"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        output.unlink(missing_ok=True)


@pytest.mark.timeout(120)
def test_bad_config_exits_2_and_is_not_requeued(slurm_cluster, digits_shards, tmp_path):
    """A real error: 90 is not divisible by the tiny model's 4 heads. Both ranks exit 2 (a user
    error); a requeue would only fail again, so the job ends FAILED with that code."""
    run_dir = tmp_path / "run"
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", CONFIG, *train_args(digits_shards, 20, "model.hidden_size=90"),
                               env=job_env(RUN_DIR=str(run_dir)),
                               sbatch_args=("--nodes=2", f"--output={tmp_path}/slurm-%j.out"))
    info = slurm_cluster.wait_finished(job, timeout=100)
    out = slurm_cluster.output(info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", out
    assert "error: model.hidden_size (90) must be divisible by model.num_attention_heads (4)" in out
    assert "exit code 2: not requeueing" in out
    # A requeue happens before the batch script ends: the job would be PENDING, not FAILED.
    assert info["Restarts"] == "0"
    assert out.count("[job ") == out.count("restart 0]")  # one run only
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.timeout(240)
def test_srun_variant_trains_checkpoints_on_usr1_and_requeues(slurm_cluster, digits_shards, tmp_path):
    """One srun task per rank, no torchrun: the trainer reads SLURM_PROCID and the script's
    MASTER_ADDR/PORT, and gets USR1 straight from the batch shell's scancel (so do its DataLoader
    workers). Config and overrides from the environment (CONFIG, OVERRIDES) this time, and the
    objective is MAE: preemption on Slurm is the same for every objective, and this covers one
    without labels. The resume after the requeue is the same as above, so the requeued job is
    cancelled before it starts."""
    run_dir = tmp_path / "run"
    mae = ("train.objective=mae", *TINY_DECODER)
    env = job_env(RUN_DIR=str(run_dir), CONFIG=CONFIG, OVERRIDES=" ".join(train_args(digits_shards, 1000, *mae)))
    job = slurm_cluster.sbatch("slurm/pretrain_srun.sbatch", env=env,
                               sbatch_args=("--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/slurm-%j.out"))
    watch = Watch(slurm_cluster, job, run_dir, rank_var="SLURM_PROCID")
    watch.until_steps(2, timeout=150)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    try:
        info = slurm_cluster.wait_job(job, lambda j: j.get("Restarts") == "1", timeout=120, what="requeue")
    finally:
        slurm_cluster.run("scancel", str(job), check=False)
    out = slurm_cluster.output(info, tail=1_000_000)
    assert watch.nodes == {0: "n1", 1: "n2"}  # SLURM_PROCID order: rank 0 on the first node
    assert "tasks=2 master=n1:" in out and "exited 75: requeueing" in out, out
    stopped = stop_step(out, "SIGUSR1")
    assert_checkpoints(run_dir, [stopped])
    for rank in (0, 1):
        assert [r["step"] for r in ledger(run_dir, rank)] == list(range(1, stopped + 1))
    marker = json.loads((run_dir / "checkpoints" / f"step-{stopped}" / "COMPLETE").read_text())
    assert marker["task"] == "mae"


@pytest.mark.timeout(180)
def test_scancel_checkpoints_and_is_not_requeued(slurm_cluster, digits_shards, tmp_path):
    """scancel sends SIGTERM: the trainer still checkpoints (exit 75), but a cancelled job stays
    cancelled. (A new job with the same RUN_DIR would resume from that checkpoint, as a requeue does.)"""
    run_dir = tmp_path / "run"
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", CONFIG, *train_args(digits_shards, 1000),
                               env=job_env(RUN_DIR=str(run_dir)),
                               sbatch_args=("--nodes=2", f"--output={tmp_path}/slurm-%j.out"))
    watch = Watch(slurm_cluster, job, run_dir)
    watch.until_steps(2, timeout=150)
    slurm_cluster.run("scancel", str(job))
    info, out = watch.until_finished(timeout=120)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", out
    assert "got SIGTERM" in out and re.search(r"exit 75\) but the job is [A-Z]+: not requeueing", out), out
    stopped = stop_step(out, "SIGTERM|SIGUSR1")  # both come: SIGTERM from Slurm, USR1 from the batch shell
    assert_checkpoints(run_dir, [stopped])
    assert [r["step"] for r in ledger(run_dir, 0)] == list(range(1, stopped + 1))


@pytest.mark.timeout(300)
def test_scancel_full_term_checkpoints_requeues_and_no_trainer_outlives_its_step(slurm_cluster, digits_shards,
                                                                                tmp_path):
    """`scancel --full --signal=TERM` signals every process of the batch step, srun included, and
    srun answers a TERM by SIGKILLing its tasks ("forcing job termination"): the trainers used to
    die unsaved, or (in their own sessions, under torchrun) train on outside Slurm. srun now runs in
    a process group of its own, and the TERM reaches the trainers through the batch shell:
    checkpoint, 75, requeue. Then TERM to the requeued job's srun itself: every trainer ends with
    its step (the parent-death signal from its torchrun), none is left running."""
    run_dir = tmp_path / "run"
    # No metrics lines: a trainer that writes to its closed output pipe dies of SIGPIPE anyway; a
    # quiet one (the usual log_every) lived on, and kept its slurmstepd waiting for its output.
    args = train_args(digits_shards, 1000, "train.log_every=1000")
    job = slurm_cluster.sbatch("slurm/pretrain.sbatch", CONFIG, *args,
                               env=job_env(RUN_DIR=str(run_dir)),
                               sbatch_args=("--nodes=2", f"--output={tmp_path}/slurm-%j.out"))
    try:
        watch = Watch(slurm_cluster, job, run_dir)
        watch.until_steps(2, timeout=150)
        slurm_cluster.run("scancel", "--full", "--signal=TERM", str(job))
        info = slurm_cluster.wait_job(job, lambda j: j.get("Restarts") == "1", timeout=120, what="requeue")
        out = slurm_cluster.output(info, tail=1_000_000)
        assert "got SIGTERM" in out and "exited 75: requeueing" in out and "forcing job termination" not in out, out
        stopped = stop_step(out, "SIGTERM|SIGUSR1")
        assert_checkpoints(run_dir, [stopped])
        assert (run_dir / "exit_status").read_text().strip() == "75"
        watch.until_steps(stopped + 2, timeout=150)  # the requeued job resumed and trains
        assert len(slurm_cluster.processes(job, "launch/pretrain.py", trainers_only=True)) == 2
        # What --full did before, and still does where proctrack/cgroup puts srun in the signalled
        # set: TERM to srun, which SIGKILLs the step's tasks (torchrun_node) but not the trainers,
        # which torchrun starts in sessions of their own.
        os.kill(srun_pid(slurm_cluster, job), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while left := slurm_cluster.processes(job, "launch/pretrain.py"):
            assert time.monotonic() < deadline, f"{len(left)} trainers outlived their job step"
            time.sleep(0.2)
    finally:
        slurm_cluster.run("scancel", str(job), check=False)


def srun_pid(cluster: SlurmCluster, job: int) -> int:
    """The pid of the srun that the job's batch shell started (it runs on this machine)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if entry.name.isdigit() and Path(argv[0].decode()).name == "srun":
                env = (entry / "environ").read_bytes().split(b"\0")
                conf = f"SLURM_CONF={cluster.env['SLURM_CONF']}".encode()
                if f"SLURM_JOB_ID={job}".encode() in env and conf in env:
                    return int(entry.name)
        except (OSError, IndexError):
            continue
    raise AssertionError(f"no srun of job {job}")
