"""Real torchrun runs shared by the checkpoint tests, made once per session and interrupted the
way a cluster interrupts them: SIGUSR1 to the worker processes, SIGKILL to the whole job.

Each run is a few seconds of training behind ~20 s of start-up on 2 cores, so the tests share
them: an uninterrupted run and its interrupted-then-resumed twin per ZeRO stage.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import PRETRAIN, ROOT, TINY, WORKERS, first_train_shards, run_env, shard_overrides

_CACHE: dict[str, object] = {}

STEPS = 16  # per run; periodic checkpoints every EVERY steps
EVERY = 4


# A wider, deeper model for the preemption pair: its checkpoint (~80 MB) takes long enough to
# write and fsync that a second signal lands inside the save every time; the tiny model's save
# is over in a few ms, less than the test's polling and signalling take on a busy machine.
# Its rows come every 3 steps: the stop signal is then agreed one step late (steady-state steps
# agree on the host without waiting), while the trainer holds the next batch already prefetched.
SLOW_SAVE = ["model.hidden_size=256", "model.intermediate_size=1024", "model.num_hidden_layers=6",
             "train.log_every=3"]


# Every shared run keeps an EMA of its weights: its checkpoints carry it (resumed bitwise, exported
# with --ema, rebuilt on another world size) and every evaluation reports val_*_ema.
EMA = ["train.ema_decay=0.9"]


# The slow-save runs (the ZeRO-2 preemption pair, the async kill -9 chain and their uninterrupted
# twin) and the ZeRO-3 kill -9 / SIGUSR1 chain (killed_pair, and its own twin) train DeiT's whole
# recipe (configs/imagenet_deit_b16.yaml): RandAugment in the workers, mixup/cutmix with smoothed
# targets, random erasing on the device, repeated augmentation x3 and drop path, beside the EMA;
# their resumes are bitwise with every piece's randomness in play.
DEIT = ["data.auto_augment=rand-m9-mstd0.5-inc1", "data.mixup=0.8", "data.cutmix=1.0", "data.mixup_prob=1.0",
        "data.mixup_switch_prob=0.5", "data.mixup_mode=batch", "data.reprob=0.25", "data.remode=pixel",
        "data.recount=1", "data.aug_repeats=3", "model.drop_path_rate=0.1", "train.label_smoothing=0.1"]


def common(shards: Path, stage: int, slow_save: bool = False, deit: bool | None = None) -> list[str]:
    """The shared runs' overrides; ``deit`` (DeiT's recipe) goes with ``slow_save`` unless given."""
    deit = slow_save if deit is None else deit
    return [*TINY, WORKERS, *shard_overrides(shards), f"train.zero_stage={stage}", "train.precision=fp32",
            f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "data.ledger=true", *EMA,
            *(SLOW_SAVE if slow_save else []), *(DEIT if deit else [])]


@dataclass
class Launch:
    """A torchrun job, in a session of its own (signals meant for pytest's terminal do not reach it)."""

    out: Path
    process: subprocess.Popen
    log_path: Path
    returncode: int | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The training processes: torchrun's children (their DataLoader workers are grandchildren)."""
        return children(self.process.pid)

    def wait(self, timeout: float = 300) -> int:
        self.returncode = self.process.wait(timeout=timeout)
        return self.returncode

    def kill_all(self) -> None:
        """SIGKILL to torchrun and every process below it, as when a node dies. (torchrun starts each
        worker in a session of its own, so killing torchrun's process group would miss them.)"""
        tree, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children(pid))
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in tree[1:]):
            assert time.monotonic() < deadline, "killed processes still running"
            time.sleep(0.05)


def launch(nproc: int, out: Path, overrides: list[str], script: Path = PRETRAIN, wrapper: tuple[str, ...] = ()) -> Launch:
    """``wrapper``: a command that runs torchrun, e.g. ("timeout", "-s", "USR1", "600")."""
    command = [*wrapper, sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), "--config", str(ROOT / "configs/digits_tiny.yaml"), *overrides,
               f"train.output_dir={out}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.{time.time_ns()}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=run_env(),
                                   start_new_session=True)
    return Launch(out=out, process=process, log_path=log_path)


def run(nproc: int, out: Path, overrides: list[str], timeout: float = 300) -> Launch:
    job = launch(nproc, out, overrides)
    job.wait(timeout)
    return job


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def wait_until(condition, job: Launch, what: str, timeout: float = 240, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job.process.poll() is not None:
            raise AssertionError(f"the run ended (rc {job.process.returncode}) before {what}:\n{job.log[-3000:]}")
        if time.monotonic() > deadline:
            job.kill_all()
            raise AssertionError(f"timed out waiting for {what}:\n{job.log[-3000:]}")
        time.sleep(poll)


def ledger_steps(out: Path, rank: int = 0) -> int:
    path = out / "ledger" / f"rank{rank}.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def train_rows(out: Path) -> dict[int, dict]:
    """Metrics rows by step; a step logged twice (before a kill and after the resume) keeps the later row."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row
    return rows


def ledger_lines(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / "ledger" / f"rank{rank}.jsonl").read_text().splitlines()]


@dataclass
class Pair:
    """An uninterrupted run and the same configuration interrupted, then resumed (resume=auto)."""

    stage: int
    full: Path
    interrupted: Path
    first: Launch  # the interrupted launch
    second: Launch  # the resumed launch
    notes: dict = field(default_factory=dict)


def uninterrupted(base: Path, shards: Path, stage: int, slow_save: bool = False, deit: bool | None = None) -> Path:
    deit = slow_save if deit is None else deit
    key = f"full-{stage}-{slow_save}-{deit}"
    if key not in _CACHE:
        out = base / f"full-zero{stage}{'-slow-save' if slow_save else ''}{'-deit' if deit and not slow_save else ''}"
        job = run(2, out, common(shards, stage, slow_save, deit))
        assert job.returncode == 0, job.log[-3000:]
        _CACHE[key] = out
    return _CACHE[key]


def preempted_pair(base: Path, shards: Path, stage: int = 2) -> Pair:
    """SIGUSR1 to both workers mid-run, a second one while the stop checkpoint is being written;
    then the same command again."""
    key = f"preempted-{stage}"
    if key in _CACHE:
        return _CACHE[key]
    full = uninterrupted(base, shards, stage, slow_save=True)
    out = base / f"preempted-zero{stage}"
    first = launch(2, out, common(shards, stage, slow_save=True))
    wait_until(lambda: ledger_steps(out, 0) >= 2 and ledger_steps(out, 1) >= 2, first, "step 2")
    workers = first.worker_pids()
    assert len(workers) == 2, workers
    root = out / "checkpoints"
    before = set(root.glob("step-*")) if root.is_dir() else set()
    signalled_at = ledger_steps(out, 0)
    os.kill(workers[0], signal.SIGUSR1)  # one rank hears it first, the other a moment later: they must agree
    time.sleep(0.05)
    os.kill(workers[1], signal.SIGUSR1)

    def stop_save_started() -> bool:  # DeepSpeed makes the step directory first, the marker comes last
        return root.is_dir() and any(p not in before for p in root.glob("step-*"))

    second_signal = "not sent"
    try:
        wait_until(stop_save_started, first, "the stop checkpoint", poll=0.002)
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
        # Delivered before the marker existed: it hit the save itself. (If this machine stalled the
        # test for the whole save, the test says so rather than pretend.)
        new = [p for p in root.glob("step-*") if p not in before]
        marked = all((p / "COMPLETE").is_file() for p in new)
        second_signal = "sent after the marker (inconclusive)" if marked else "sent while saving"
    except AssertionError:
        if first.process.poll() is None:
            raise
        second_signal = "the run ended first (inconclusive)"
    first.wait()
    notes = {"signalled_at": signalled_at, "second_signal": second_signal,
             "exit_status": (out / "exit_status").read_text().strip() if (out / "exit_status").is_file() else None,
             "ledger_steps": [[line["step"] for line in ledger_lines(out, rank)] for rank in (0, 1)],
             "checkpoints": sorted(p.name for p in root.glob("step-*") if (p / "COMPLETE").is_file())}
    second = run(2, out, common(shards, stage, slow_save=True))
    _CACHE[key] = Pair(stage=stage, full=full, interrupted=out, first=first, second=second, notes=notes)
    return _CACHE[key]


def killed_pair(base: Path, shards: Path, stage: int = 3) -> Pair:
    """DeiT's recipe: SIGKILL to the whole job after a periodic checkpoint; then, before the rerun,
    the leftovers of a save killed half-way (a step directory with part of the shards and no
    marker); the rerun stopped by SIGUSR1 after its next periodic checkpoint; then the same command
    again, to the end. ``first``: the killed launch, ``second``: the last one; ``notes["stopped"]``:
    the one in between."""
    key = f"killed-{stage}"
    if key in _CACHE:
        return _CACHE[key]
    full = uninterrupted(base, shards, stage, deit=True)
    out = base / f"killed-zero{stage}"
    overrides = common(shards, stage, deit=True)
    first = launch(2, out, overrides)
    marker = out / "checkpoints" / f"step-{EVERY}" / "COMPLETE"
    wait_until(lambda: marker.is_file() and ledger_steps(out, 0) >= EVERY + 1, first,
               f"step {EVERY + 1} after the step-{EVERY} checkpoint")
    first.kill_all()
    killed_at = ledger_steps(out, 0)
    root = out / "checkpoints"
    newest = max(int(p.name[5:]) for p in root.glob("step-*") if (p / "COMPLETE").is_file())
    partial_newer = root / f"step-{newest + EVERY}"  # the next periodic save, killed half-way
    partial_older = root / f"step-{newest - 1}"  # an older interrupted save
    for partial in (partial_newer, partial_older):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for shard in sorted((root / f"step-{newest}").glob("*.pt"))[:2]:
            data = shard.read_bytes()
            (partial / shard.name).write_bytes(data[: len(data) // 2])  # truncated, as a kill leaves it
    stopped = launch(2, out, overrides)
    # After the periodic save that replaces the partial one: SIGUSR1 to both ranks, which stop at the
    # next step boundary (STEPS - 2 * EVERY - 1 steps before the end).
    wait_until(lambda: (partial_newer / "COMPLETE").is_file() and ledger_steps(out, 0) >= newest + EVERY + 1
               and ledger_steps(out, 1) >= newest + EVERY + 1, stopped, f"step {newest + EVERY + 1}")
    for pid in stopped.worker_pids():
        os.kill(pid, signal.SIGUSR1)
    stopped.wait()
    exit_status = (out / "exit_status").read_text().strip()
    second = run(2, out, overrides)
    _CACHE[key] = Pair(stage=stage, full=full, interrupted=out, first=first, second=second,
                       notes={"killed_at": killed_at, "resumed_from": newest, "partial_newer": partial_newer,
                              "partial_older": partial_older, "stopped": stopped, "exit_status": exit_status})
    return _CACHE[key]


def without(overrides: list[str], *keys: str) -> list[str]:
    """``overrides`` less those of ``keys`` (to give them again with another value)."""
    return [o for o in overrides if o.split("=", 1)[0] not in keys]


ELASTIC_SHARDS = 2  # the elastic runs train on the first 2 train shards: 400 samples, 12 steps per epoch on 2 ranks


def elastic_common(shards: Path, stage: int) -> list[str]:
    """``common`` on a smaller training set (short epochs: a resumed run goes through the rest of
    the interrupted epoch and a whole next one in a few dozen steps), saving only at the end."""
    return [*without(common(shards, stage), "data.train_shards", "checkpoint.every_steps"),
            first_train_shards(shards, ELASTIC_SHARDS), "checkpoint.every_steps=0"]


def stopped_run(base: Path, shards: Path, stage: int = 2) -> tuple[Path, int]:
    """A 2-rank run (``elastic_common``) stopped in its first epoch by SIGUSR1, Slurm's warning
    before a preemption: its output directory and the step of its stop checkpoint."""
    key = f"stopped-{stage}"
    if key not in _CACHE:
        out = base / f"stopped-zero{stage}"
        job = launch(2, out, [*elastic_common(shards, stage), "train.max_steps=100"])
        wait_until(lambda: ledger_steps(out, 0) >= 3 and ledger_steps(out, 1) >= 3, job, "step 3")
        for pid in job.worker_pids():
            os.kill(pid, signal.SIGUSR1)
        job.wait()  # torchrun itself exits 1 when its workers exit 75; rank 0 leaves the code here
        assert (out / "exit_status").read_text().strip() == "75", job.log[-3000:]
        (tag,) = [p for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()]
        _CACHE[key] = out, int(tag.name[5:])
    return _CACHE[key]


def short_run(base: Path, shards: Path, stage: int) -> Path:
    """Two steps at ZeRO-0, or ZeRO-1 started over (resume=none, overwrite=true) in a copy of the
    finished ZeRO-2 run: a checkpoint per stage for the export tests, and a test of starting over."""
    key = f"short-{stage}"
    if key not in _CACHE:
        out = base / f"short-zero{stage}"
        overrides = [*common(shards, stage), "train.max_steps=2"]
        if stage == 1:
            shutil.copytree(uninterrupted(base, shards, 2), out)
            overrides += ["checkpoint.resume=none", "checkpoint.overwrite=true"]
        job = run(2, out, overrides)
        assert job.returncode == 0, job.log[-3000:]
        _CACHE[key] = out
    return _CACHE[key]


def checkpoint_run(base: Path, shards: Path, stage: int) -> Path:
    """A finished 2-rank fp32 run of the given ZeRO stage."""
    return uninterrupted(base, shards, stage) if stage >= 2 else short_run(base, shards, stage)
