"""A stand-in for launch/pretrain.py that keeps its contract with the Slurm scripts, and no more.

    python slurm_fake_trainer.py --config CONFIG key=value ...

- Environment: torchrun's RANK / LOCAL_RANK / WORLD_SIZE, else srun's SLURM_PROCID /
  SLURM_LOCALID / SLURM_NTASKS with MASTER_ADDR / MASTER_PORT, else one process. All ranks join
  one gloo process group, so a run proves that the rendezvous across nodes works.
- Keys: train.output_dir, train.max_steps, fake.step_seconds; any other key, or a config file
  that does not exist, is a bad config: exit 2 (as the real trainer's ConfigError).
- Steps sleep; each rank appends one line per step to <output_dir>/ledger/rank<R>.jsonl.
- SIGUSR1 / SIGTERM set a flag; at the next step boundary the ranks agree (all-reduce max),
  save a checkpoint (<output_dir>/checkpoints/step_<N>.json, N = steps done) and exit 75.
- Resume: from the newest checkpoint there, so no step is done twice and none skipped.
- Rank 0 writes <output_dir>/progress.json after each step (for tests that wait for progress).
- FAKE_TRAINER_STARTUP_S (environment): seconds to sleep before the handlers are installed, as
  the real trainer spends seconds importing; a stop signal in that time kills the process.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

PREEMPT_EXIT_CODE = 75
BAD_CONFIG_EXIT_CODE = 2
KNOWN_KEYS = {"train.output_dir": str, "train.max_steps": int, "fake.step_seconds": float}

_stop_signal: list[str] = []


def _on_signal(signum, _frame) -> None:
    _stop_signal.append(signal.Signals(signum).name)


def parse(argv: list[str]) -> dict:
    """--config FILE key=value ... -> settings; a bad config exits 2."""
    cfg = {"train.output_dir": "runs/fake", "train.max_steps": 10, "fake.step_seconds": 0.2}
    args = list(argv)
    if len(args) < 2 or args[0] != "--config":
        bad("usage: --config FILE key=value ...")
    config_file, overrides = Path(args[1]), args[2:]
    if not config_file.is_file():
        bad(f"config file {config_file} does not exist")
    lines = [ln.split("#")[0].strip() for ln in config_file.read_text().splitlines()]
    pairs = [ln.replace(": ", "=", 1) for ln in lines if ln] + overrides
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in KNOWN_KEYS:
            bad(f"unknown key {key!r}; known: {sorted(KNOWN_KEYS)}")
        cfg[key] = KNOWN_KEYS[key](value)
    return cfg


def bad(msg: str) -> None:
    print(f"fake trainer: bad config: {msg}", file=sys.stderr, flush=True)
    sys.exit(BAD_CONFIG_EXIT_CODE)


def resolve_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun, else srun, else a single process."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def latest_checkpoint(ckpt_dir: Path) -> int:
    """Steps done by the newest checkpoint, 0 without one."""
    done = [int(p.stem.split("_")[1]) for p in ckpt_dir.glob("step_*.json")]
    return max(done, default=0)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)  # atomic: a reader never sees half a file


def main(argv: list[str]) -> int:
    time.sleep(float(os.environ.get("FAKE_TRAINER_STARTUP_S", 0)))
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    cfg = parse(argv)
    rank, local_rank, world = resolve_env()

    import torch
    import torch.distributed as dist

    if world > 1:
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))

    out = Path(cfg["train.output_dir"])
    ckpt_dir, ledger_dir = out / "checkpoints", out / "ledger"
    for d in (ckpt_dir, ledger_dir):
        d.mkdir(parents=True, exist_ok=True)
    start = latest_checkpoint(ckpt_dir)
    who = {
        "rank": rank, "local_rank": local_rank, "world_size": world,
        "node": os.environ.get("SLURMD_NODENAME"), "host": socket.gethostname(),
        "job": os.environ.get("SLURM_JOB_ID"), "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
    }
    print(f"fake trainer: {who} resuming at step {start}", flush=True)

    code = 0
    with open(ledger_dir / f"rank{rank}.jsonl", "a") as ledger:
        for step in range(start, cfg["train.max_steps"]):
            time.sleep(cfg["fake.step_seconds"])
            ledger.write(json.dumps({"step": step, **who}) + "\n")
            ledger.flush()
            if rank == 0:
                write_json(out / "progress.json", {"steps_done": step + 1, **who})
            # All ranks stop at the same step: agree on the flag.
            flag = torch.tensor([1.0 if _stop_signal else 0.0])
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and step + 1 < cfg["train.max_steps"]:
                if rank == 0:
                    write_json(ckpt_dir / f"step_{step + 1}.json", {"steps_done": step + 1})
                print(f"fake trainer: rank {rank} got {_stop_signal or 'a peer signal'}, "
                      f"saved after step {step}, exiting {PREEMPT_EXIT_CODE}", flush=True)
                code = PREEMPT_EXIT_CODE
                break
    if code == 0 and rank == 0:
        write_json(out / "done.json", {"steps_done": cfg["train.max_steps"]})
    if world > 1:
        dist.barrier()  # the checkpoint is complete on every rank before any exits
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
