"""A sweep of faults through the real launcher (torchrun or a plain process, digits shards, the tiny
ViT): kill -9 in the middle of a checkpoint save, Ctrl-C (SIGINT) and SIGTERM/SIGUSR1 at a random
step, a disk that fills up, a read-only directory on one rank only, a read-only output directory
and a resume path that does not exist before the process group starts.

Every rank of every run must end with an exit code the README documents (0, 2, 75, 130; 1 only
for the rank killed by a signal and its peer), without a traceback of ours for a user or
environment error, without hanging (within 60 s of the fault: on a loaded 2-core machine the
kill during a save leaves an 80 MB checkpoint to finish on the other rank), with every complete
checkpoint still complete, and with no process of the run (trainers, fork servers, DataLoader
workers) alive 30 s after it ended.

The step at which a signal comes is drawn at random: PIPELINE_FAULT_SEED repeats a draw (the seed
is in every failure message). OUTCOMES collects one line per case; `pytest -s` prints them.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from checkpoint_runs import ledger_steps
from conftest import PRETRAIN, ROOT, TINY, WORKERS, is_trainer, run_env, shard_overrides
from pipeline.checkpoint import complete_checkpoints, step_of

SEED = int(os.environ.get("PIPELINE_FAULT_SEED", time.time_ns() % 2**32))
RNG = random.Random(SEED)
OUTCOMES: list[str] = []
FAULT_TO_END_S = 60  # a run ends this soon after its fault: it does not hang (most end in 2-5 s)
LEFT_ALIVE_S = 30  # no process of a run is alive this long after its end: nothing is orphaned
# A larger model for the kill during a save: its checkpoint (~80 MB) takes long enough to write
# that the kill lands inside the save; the tiny model's save is over in milliseconds.
SLOW_SAVE = ["model.hidden_size=256", "model.intermediate_size=1024", "model.num_hidden_layers=6"]


@dataclass
class Run:
    out: Path
    process: subprocess.Popen
    log_path: Path
    mark: str  # in every process's environment: how the run's processes are found
    nproc: int = 2

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def steps(self, rank: int = 0) -> int:
        return ledger_steps(self.out, rank)

    def until(self, condition, what: str, timeout: float = 240, poll: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"[seed {SEED}] the run ended (rc {self.process.returncode}) before {what}:\n"
                                     f"{self.log[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"[seed {SEED}] timed out waiting for {what}:\n{self.log[-3000:]}")
            time.sleep(poll)

    def trainers(self) -> dict[int, int]:
        """{rank: pid} of the training processes."""
        found = {}
        for pid, env in processes(self.mark).items():
            if is_trainer(pid):
                found[int(env.get("RANK", 0))] = pid
        return found

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"[seed {SEED}] still running {timeout:.0f} s after the fault:\n{self.log[-3000:]}")

    def kill(self) -> None:
        for pid in processes(self.mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def processes(mark: str) -> dict[int, dict[str, str]]:
    """Live processes (zombies excluded) whose environment holds ``mark``, with their environments."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if f"PIPELINE_FAULT_RUN={mark}".encode() not in environ.split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        found[int(entry.name)] = dict(item.split("=", 1) for item in environ.decode(errors="replace").split("\0")
                                      if "=" in item)
    return found


def start(out: Path, overrides: list[str], *, nproc: int = 2, command: list[str] | None = None,
          log_dir: Path | None = None) -> Run:
    """torchrun (or, with nproc=1, a plain process) in a session of its own, as a user starts it."""
    mark = uuid.uuid4().hex
    launcher = command or ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    argv = [*launcher, str(PRETRAIN), "--config", str(ROOT / "configs/digits_tiny.yaml"), *overrides,
            f"train.output_dir={out}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = (log_dir or out.parent) / f"{out.name}.{time.time_ns()}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**run_env(), "PIPELINE_FAULT_RUN": mark}, start_new_session=True)
    return Run(out, process, log_path, mark, nproc)


def base(shards: Path, *extra: str) -> list[str]:
    return [*TINY, *shard_overrides(shards), "train.zero_stage=2", "train.precision=fp32", "data.ledger=true",
            "train.max_steps=400", "train.eval_every=0", *extra]


def finish(run: Run, case: str, *, codes: set[int], fault_at: float, expected_status: str | None,
           rc: set[int] | None = None, within_s: float = FAULT_TO_END_S) -> str:
    """The checks every case shares; returns the log. ``codes``: the trainers' exit codes, every
    rank's (see ``rank_codes``); ``rc``: torchrun's, where it has one of its own (1 for any failed
    worker, 1 after its own SIGINT); without one, the process's own code is a trainer's too."""
    code = run.wait(timeout=max(1.0, fault_at + within_s - time.monotonic()))
    ended = time.monotonic()
    log = run.log
    worker_codes = rank_codes(log)
    if rc is None:
        assert code in codes, f"[seed {SEED}] {case}: the process exited {code}, expected {codes}\n{log[-3000:]}"
        if run.nproc == 1:
            worker_codes.setdefault(0, code)
    else:
        assert code in rc, f"[seed {SEED}] {case}: torchrun exited {code}, expected {rc}\n{log[-3000:]}"
    assert sorted(worker_codes) == list(range(run.nproc)) and set(worker_codes.values()) <= codes, \
        f"[seed {SEED}] {case}: exit codes by rank {worker_codes}, expected {codes} for each of {run.nproc}\n{log[-3000:]}"
    # torchrun prints its own ChildFailedError traceback when a worker fails; ours must not appear
    assert "/pipeline/" not in log and 'pretrain.py", line' not in log, f"{case}: a traceback of ours\n{log[-4000:]}"
    status = (run.out / "exit_status").read_text().strip() if (run.out / "exit_status").is_file() else None
    if expected_status is not None:
        assert status == expected_status, f"{case}: exit_status {status!r}\n{log[-3000:]}"
    while processes(run.mark):
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in processes(run.mark)}
        assert time.monotonic() - ended < LEFT_ALIVE_S, f"{case}: left alive {LEFT_ALIVE_S} s after the end: {left}"
        time.sleep(0.2)
    assert_checkpoints_sound(run.out)
    OUTCOMES.append(f"{case}: rc {code}, workers {sorted(worker_codes)}, exit_status {status}, "
                    f"ended {ended - fault_at:.1f} s after the {'fault' if within_s == FAULT_TO_END_S else 'launch'}")
    return log


def rank_codes(log: str) -> dict[int, int]:
    """{rank: exit code} from what the run printed: torchrun's failure summary, the srun-like
    launcher's "exit codes by rank", or a rank's own "checkpoint saved, exiting N" (a rank that
    stopped cleanly is not in torchrun's summary when another failed first)."""
    found = {int(r): int(c) for r, c in re.findall(r"\[rank(\d+)\] WARNING [\w.]+: stopped by .*?, exiting (\d+)", log)}
    found |= {int(r): int(c) for r, c in
              re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", log)}
    by_rank = re.search(r"exit codes by rank: \[([-\d, ]+)\]", log)
    if by_rank:
        found |= dict(enumerate(int(c) for c in by_rank.group(1).split(",")))
    return found


def complete_steps(out: Path) -> list[int]:
    return [step_of(p) for p in complete_checkpoints(out / "checkpoints")]


def assert_checkpoints_sound(out: Path) -> None:
    """Every COMPLETE marker vouches for a whole checkpoint, and ``latest`` names a complete one."""
    for step in complete_steps(out):
        tag = out / "checkpoints" / f"step-{step}"
        marker = json.loads((tag / "COMPLETE").read_text())
        assert marker["step"] == step
        shards = list(tag.glob("*optim_states.pt"))
        assert len(shards) == marker["world_size"] and all(s.stat().st_size > 0 for s in shards), tag
    latest = out / "checkpoints" / "latest"
    if latest.is_file():
        assert (out / "checkpoints" / latest.read_text().strip() / "COMPLETE").is_file()


@pytest.fixture(scope="module")
def killed_mid_save(tmp_path_factory, digits_shards) -> tuple[Run, dict]:
    """kill -9 of rank 0's trainer while a checkpoint is being written (every 2 steps)."""
    out = tmp_path_factory.mktemp("faults") / "killed"
    run = start(out, base(digits_shards, WORKERS, *SLOW_SAVE, "checkpoint.every_steps=2", "checkpoint.keep_last=10"))
    run.until(lambda: len(complete_steps(out)) >= 1, "the first checkpoint")
    for _ in range(20):  # wait for a save and kill while it is unfinished; else wait for the next one
        before = set(complete_steps(out))
        run.until(lambda: any(not (p / "COMPLETE").is_file() and int(p.name[5:]) not in before
                              for p in (out / "checkpoints").glob("step-*")), "a save in progress", poll=0.002)
        trainers = run.trainers()
        partial = [p for p in (out / "checkpoints").glob("step-*") if not (p / "COMPLETE").is_file()]
        if partial:
            helpers = {pid for pid in processes(run.mark) if pid not in trainers.values()}
            os.kill(trainers[0], signal.SIGKILL)
            killed_at = time.monotonic()
            break
    else:
        pytest.fail(f"no save was caught unfinished in 20 tries:\n{run.log[-2000:]}")
    finish(run, "kill -9 of rank 0 mid-save (torchrun, 1 DataLoader worker per rank)", codes={-9, 1}, rc={1},
           fault_at=killed_at, expected_status="running")
    # Rank 0 writes the marker last: a save it had finished before the kill would have one now.
    notes = {"complete_before": sorted(before), "helpers": len(helpers),
             "killed_saves": {step_of(p): p.is_dir() and not (p / "COMPLETE").exists() for p in partial}}
    return run, notes


def test_kill_9_mid_save_keeps_every_complete_checkpoint_and_leaves_no_process(killed_mid_save):
    run, notes = killed_mid_save
    assert notes["helpers"] >= 4  # fork servers and workers were running when the trainer died
    killed = notes["killed_saves"]
    assert killed and all(killed.values()), killed  # the kill landed mid-save: unmarked, and left so
    assert not set(killed) & set(complete_steps(run.out))  # the killed save is not among the complete
    assert complete_steps(run.out)[: len(notes["complete_before"])] == notes["complete_before"]
    assert "another rank ended without saying why" in run.log  # rank 1: one line, not a gloo traceback


def test_rerun_resumes_the_newest_complete_checkpoint_and_ctrl_c_saves_and_exits_130(killed_mid_save,
                                                                                      digits_shards):
    first, _ = killed_mid_save
    newest = complete_steps(first.out)[-1]
    assert newest not in killed_mid_save[1]["killed_saves"]  # the save that was killed has no marker
    run = start(first.out, base(digits_shards, WORKERS, *SLOW_SAVE, "checkpoint.keep_last=10"))
    run.until(lambda: f"resumed from {first.out}/checkpoints/step-{newest} at step {newest}" in run.log,
              f"the resume from step-{newest}")
    at = newest + RNG.randint(1, 6)
    run.until(lambda: run.steps() >= at, f"step {at}")
    os.kill(run.process.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches torchrun, which passes it on
    log = finish(run, f"SIGINT to torchrun at step {at}", codes={130}, rc={1}, fault_at=time.monotonic(),
                 expected_status="130")  # torchrun itself ends with its SignalException: 1
    stops = {int(s) for s in re.findall(r"stopped by SIGINT at step (\d+); checkpoint saved, exiting 130", log)}
    assert len(stops) == 1 and log.count("exiting 130") == 2, log[-3000:]
    assert complete_steps(run.out)[-1] == stops.pop() >= at


def test_a_stop_signal_at_a_random_step_saves_and_exits_75(tmp_path, digits_shards):
    how = RNG.choice(["SIGTERM", "SIGUSR1"])
    run = start(tmp_path / "run", base(digits_shards, "data.num_workers=2"), nproc=1)
    at = RNG.randint(2, 8)
    run.until(lambda: run.steps() >= at, f"step {at}")
    os.killpg(run.process.pid, getattr(signal, how))  # trainer, fork server and workers: as Slurm signals
    log = finish(run, f"{how} to the process group at step {at} (plain process, 2 workers)", codes={75},
                 fault_at=time.monotonic(), expected_status="75")
    assert f"stopped by {how} at step" in log and "DataLoader worker" not in log


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs that holds about one checkpoint of the tiny model and its logs (root only)."""
    if os.geteuid() != 0:
        yield None
        return
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


# Without root, no disk can be made to fill up: the metrics file is swapped for /dev/full after a
# few rows, whose writes fail with the kernel's own ENOSPC, through the real writer.
FULL_AFTER_ROWS = """
import runpy, sys
from pipeline import metrics
rows = [0]
log = metrics.JsonlWriter.log
def log_then_fill(self, row, step):
    rows[0] += 1
    if rows[0] == {rows}:
        self._file = open("/dev/full", "w", buffering=1)
    log(self, row, step)
metrics.JsonlWriter.log = log_then_fill
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_ends_every_rank_with_one_line_and_exit_2(small_disk, tmp_path, digits_shards):
    if small_disk is not None:  # a real disk that fills up during the second checkpoint
        out, command, what = small_disk / "run", None, "a 2.6 MB tmpfs"
    else:  # not root: the metrics writer's disk "fills up" after 5 rows
        script = tmp_path / "full_disk.py"
        script.write_text(FULL_AFTER_ROWS.format(rows=5))
        out, what = tmp_path / "run", "a patched metrics writer"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    run = start(out, base(digits_shards, "checkpoint.every_steps=4"), command=command, log_dir=tmp_path)
    run.until(lambda: "No space left on device" in run.log, "the disk to fill up", poll=0.02)
    log = finish(run, f"full disk ({what})", codes={2}, rc={1}, fault_at=time.monotonic(), expected_status="2")
    lines = re.findall(r"\[rank(\d)\] ERROR [\w.]+: (.*)", log)
    assert {rank for rank, _ in lines} == {"0", "1"}, log[-3000:]
    assert all("[Errno 28] No space left on device" in line for _, line in lines), lines
    assert re.search(r"could not write (checkpoint step-\d+|metrics|TensorBoard events|the sample ledger) to '"
                     + re.escape(str(out)), lines[0][1]), lines
    if small_disk is not None:
        assert complete_steps(out) == [4], log[-2000:]  # the first checkpoint fit, and is still whole


# Two ranks started the way srun starts them without torchrun: RANK etc. set by hand, rank 0's
# process holding the c10d store.
TWO_RANKS = """
import os, socket, subprocess, sys
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = str(sock.getsockname()[1])
env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
ranks = [subprocess.Popen([sys.executable, *sys.argv[1:]], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
         for r in (0, 1)]
codes = [rank.wait() for rank in ranks]
print("exit codes by rank:", codes, flush=True)
sys.exit(max(codes))
"""


@pytest.mark.parametrize("launcher", ["torchrun", "srun-like"])
def test_a_write_failure_on_rank_0_alone_ends_rank_1_with_the_same_line(tmp_path, digits_shards, launcher):
    """Only rank 0 writes TensorBoard's events; its folder is read-only. Under torchrun the report
    goes through the agent's store; without torchrun, rank 0's store leaves with its process and
    the report is read from the run directory."""
    out = tmp_path / "run"
    board = out / "tensorboard"
    board.mkdir(parents=True)
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(board)], check=True)
    else:
        board.chmod(0o555)
    command = None if launcher == "torchrun" else [sys.executable, "-c", TWO_RANKS]
    try:
        run = start(out, base(digits_shards), command=command)
        run.until(lambda: "ERROR" in run.log, "the write failure", poll=0.02)
        log = finish(run, f"read-only TensorBoard folder ({launcher}; rank 0 writes it, rank 1 does not)",
                     codes={2}, rc={1} if launcher == "torchrun" else None, fault_at=time.monotonic(),
                     expected_status="2")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(board)], check=False)
    line = re.search(r"\[rank0\] ERROR [\w.]+: (could not write TensorBoard events to .*)", log).group(1)
    assert f"[rank1] ERROR pipeline.distributed.faults: stopped because rank 0 failed: {line}" in log
    assert "Read-only file system" in line or "Permission denied" in line
    assert "Connection closed by peer" not in log
    if launcher == "torchrun":
        assert log.count("traceback : ") == 2  # torchrun's summary: the line, for both ranks
    else:
        assert "exit codes by rank: [2, 2]" in log


@pytest.mark.parametrize("mistake", ["resume path", "read-only output dir"])
def test_a_mistake_found_before_the_process_group_is_the_same_on_every_rank(tmp_path, digits_shards, mistake):
    """Checked on every rank before any rank waits for another: no "connectFullMesh" race."""
    out = tmp_path / "run"
    extra = []
    if mistake == "resume path":
        extra = [f"checkpoint.resume={tmp_path / 'no-such-run'}"]
        expected = f"checkpoint.resume={tmp_path / 'no-such-run'}: no such path"
    else:
        out.mkdir()
        if os.geteuid() == 0:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(out)], check=True)
        else:
            out.chmod(0o555)
        expected = f"cannot write to '{out}'"
    try:
        launched = time.monotonic()
        run = start(out, base(digits_shards, *extra))
        log = finish(run, f"{mistake} (torchrun, refused before the process group)", codes={2}, rc={1},
                     fault_at=launched, within_s=120, expected_status=None)
    finally:
        if mistake != "resume path" and os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(out)], check=False)
    # said once (by the first rank to find it), and named in torchrun's summary for every rank
    lines = re.findall(r"^error: (.*)$", log, re.MULTILINE)
    assert len(lines) == 1 and expected in lines[0], log[-3000:]
    assert expected in log.split("Root Cause (first observed failure):")[1], log[-3000:]
    status = run.out / "exit_status"
    assert status.read_text() == "2\n" if mistake == "resume path" else not status.exists()
    assert "connectFullMesh" not in log and "DeepSpeed engine" not in log


def test_a_refusal_comes_before_waiting_for_the_other_ranks(tmp_path, digits_shards):
    """Rank 0 of a world of 2 whose rank 1 never comes: the bad resume path is refused at once,
    not after waiting for rank 1 in the process group (where the refusal used to be a race)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**run_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PIPELINE_DIST_TIMEOUT_S": "300"}
    missing = tmp_path / "no-such-run"
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(ROOT / "configs/digits_tiny.yaml"),
                             *base(digits_shards, f"checkpoint.resume={missing}"),
                             f"train.output_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"checkpoint.resume={missing}: no such path" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    OUTCOMES.append(f"resume path, rank 0 of 2 alone: rc {result.returncode}, "
                    f"{time.monotonic() - started:.1f} s after the launch")


@pytest.fixture(scope="module", autouse=True)
def outcomes_reported():
    """After the module's tests: the sweep's cases and how each ended (shown with ``pytest -s``)."""
    yield
    print(f"\nfault sweep, seed {SEED}: {len(OUTCOMES)} cases")
    for line in OUTCOMES:
        print("  " + line)
