"""Real 2-rank torchrun runs of mae and simmim, made once per session and shared by the tests of
test_train_masked.py: start-up (15-30 s on 2 cores) is most of a run's cost, so each run serves
several tests, and four runs cover the four ZeRO stages (each objective at two of them):

- mae at ZeRO-0 and ZeRO-3, simmim at ZeRO-1 and ZeRO-2, all bf16, 16 steps, through
  tests/integration/guarded_pretrain.py;
- mae at ZeRO-3 and simmim at ZeRO-2 are also the uninterrupted twins of a run stopped by
  SIGUSR1 to torchrun itself and resumed (mae: `timeout -s USR1` running out; simmim: `kill -USR1
  <torchrun>`): torchrun dies of it, and its death is a SIGTERM to its ranks, which save and exit 75; simmim at ZeRO-1 trains on unlabeled shards (no .cls at all); simmim at
  ZeRO-2 starts from the encoder of the mae ZeRO-3 run (train.init_from).

The other four pairs (mae at ZeRO 1-2, simmim at ZeRO 0 and 3) pass too: add them to STAGE_RUNS
to run them (about 25 s each here).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import checkpoint_runs
from checkpoint_runs import Launch, _state, children, ledger_steps, wait_until
from conftest import ROOT, TINY, TINY_DECODER, shard_overrides

GUARDED = Path(__file__).with_name("guarded_pretrain.py")
PRETRAIN = ROOT / "launch" / "pretrain.py"
STEPS, EVERY, EVAL_EVERY = 16, 4, 8
# A small decoder, SimMIM's stride and blocks for 16x16 images of 4x4 patches, a k-NN bank of 200
# samples (bf16 is emulated on these CPUs: a 600-sample bank took 7 s of each evaluation, 200 take ~2 s);
# decoding in the trainers' processes (2 s less start-up per run; workers are the classification tests').
MASKED = [*TINY, *TINY_DECODER, "data.num_workers=0", "train.precision=bf16", f"train.max_steps={STEPS}",
          f"checkpoint.every_steps={EVERY}", f"train.eval_every={EVAL_EVERY}", "data.ledger=true",
          "probe.bank_size=200"]
STAGE_RUNS = [("mae", 0), ("mae", 3), ("simmim", 1), ("simmim", 2)]
TWIN_STAGE = {"mae": 3, "simmim": 2}  # the run that is also a resume pair's uninterrupted twin
UNLABELED = ("simmim", 1)
INIT_FROM = {("simmim", 2): ("mae", 3)}  # run -> the run whose encoder it starts from

_CACHE: dict[object, object] = {}


def unlabeled_shards(base: Path) -> Path:
    """The digits without their labels (make_shards --unlabeled), written once per session."""
    if "unlabeled" not in _CACHE:
        from pipeline.data.shards import write_shards

        out = base / "digits-unlabeled"
        write_shards("digits", out, shard_size=200, val_fraction=0.1, unlabeled=True)
        _CACHE["unlabeled"] = out
    return _CACHE["unlabeled"]


def overrides(base: Path, shards: Path, objective: str, stage: int) -> list[str]:
    data = unlabeled_shards(base) if (objective, stage) == UNLABELED else shards
    extra = []
    if (objective, stage) in INIT_FROM:
        extra.append(f"train.init_from={stage_run(base, shards, *INIT_FROM[objective, stage]).out}")
    return [*MASKED, *shard_overrides(data), f"train.objective={objective}", f"train.zero_stage={stage}", *extra]


def launch(script: Path, out: Path, args: list[str], wrapper: tuple[str, ...] = ()) -> Launch:
    return checkpoint_runs.launch(2, out, args, script=script, wrapper=wrapper)


def stage_run(base: Path, shards: Path, objective: str, stage: int) -> Launch:
    """The finished guarded run of ``objective`` at ZeRO ``stage`` (the test asserts its exit code)."""
    key = ("stage", objective, stage)
    if key not in _CACHE:
        args = overrides(base, shards, objective, stage)
        job = launch(GUARDED, base / f"{objective}-zero{stage}", args)
        job.wait(timeout=300)
        _CACHE[key] = job
    return _CACHE[key]


@dataclass
class Pair:
    full: Launch
    first: Launch  # torchrun (mae: under `timeout`) stopped by SIGUSR1
    second: Launch  # the same command again: resumes
    stopped_at: int
    how: str  # how SIGUSR1 reached torchrun
    exit_status: str | None  # the first launch's, once its ranks had ended


# How each pair's SIGUSR1 reaches torchrun, as a user sends it: coreutils' `timeout -s USR1 N`
# running out (its timer is a SIGALRM to itself: sending one ends the wait now), or `kill -USR1`.
SIGNALLED = {"mae": "timeout -s USR1", "simmim": "kill -USR1 <torchrun>"}


def trainers(pid: int) -> list[int]:
    """The training processes below ``pid`` (torchrun's children; under `timeout`, its grandchildren)."""
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if any(a.endswith(b"pretrain.py") for a in argv) and b"torch.distributed.run" not in argv:
            found.append(child)
        else:
            todo.extend(children(child))
    return sorted(found)


def preempted_pair(base: Path, shards: Path, objective: str) -> Pair:
    """The twin, then the same configuration stopped by SIGUSR1 to torchrun after its first steps
    and resumed."""
    key = ("pair", objective)
    if key not in _CACHE:
        stage = TWIN_STAGE[objective]
        full = stage_run(base, shards, objective, stage)
        args, out = overrides(base, shards, objective, stage), base / f"{objective}-zero{stage}-preempted"
        how = SIGNALLED[objective]
        first = launch(PRETRAIN, out, args, wrapper=("timeout", "-s", "USR1", "600") if how.startswith("timeout") else ())
        wait_until(lambda: ledger_steps(out, 0) >= 1 and ledger_steps(out, 1) >= 1, first, "step 1")
        ranks = trainers(first.process.pid)
        assert len(ranks) == 2, ranks
        os.kill(first.process.pid, signal.SIGALRM if how.startswith("timeout") else signal.SIGUSR1)
        first.wait()  # torchrun (and `timeout`) end at once; the ranks, orphaned, save and exit
        deadline = time.monotonic() + 120
        while any(_state(pid) != "Z" for pid in ranks):
            assert time.monotonic() < deadline, f"ranks still running 120 s after torchrun ended:\n{first.log[-3000:]}"
            time.sleep(0.05)
        status = (out / "exit_status").read_text().strip() if (out / "exit_status").is_file() else None
        stopped_at = ledger_steps(out, 0)
        second = launch(PRETRAIN, out, args)
        second.wait(timeout=300)
        _CACHE[key] = Pair(full=full, first=first, second=second, stopped_at=stopped_at, how=how,
                           exit_status=status)
    return _CACHE[key]
