"""One resolver for "who am I in this job": torchrun's variables, else Slurm's, else one process.

A partial environment (RANK without WORLD_SIZE, say) is an error, not a guess: a wrong guess
makes ranks wait for each other forever.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from pipeline.errors import UserError


class DistributedEnvError(UserError, RuntimeError):
    """The launch environment is inconsistent; the message names the variables and the fix."""

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Write the torch.distributed variables, so DeepSpeed's init finds them (and no MPI)."""
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_WORLD_SIZE=str(self.local_world_size),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedEnvError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _slurm_master(env: Mapping[str, str]) -> str:
    """The first host of the job's node list, e.g. 'gpu[003-004,010]' -> 'gpu003'."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first_range = rest.split(",")[0].split("]")[0]
        return prefix + first_range.split("-")[0]
    return first


def resolve_env(env: Mapping[str, str] | None = None) -> DistributedEnv:
    """torchrun (or the deepspeed launcher) first, then srun without torchrun, else one process."""
    env = os.environ if env is None else env
    present = [name for name in TORCHRUN_VARS if name in env]
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [name for name in TORCHRUN_VARS if name not in env]
        if missing:
            raise DistributedEnvError(
                f"partial distributed environment: {', '.join(present)} set but {', '.join(missing)} missing; "
                "launch with torchrun (which sets all of them) or unset them for a single process")
        world_size = _int(env, "WORLD_SIZE")
        return DistributedEnv(rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK"), world_size=world_size,
                              local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)),
                              master_addr=env["MASTER_ADDR"], master_port=_int(env, "MASTER_PORT"),
                              launcher="torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        for name in ("SLURM_LOCALID", "SLURM_NTASKS"):
            if name not in env:
                raise DistributedEnvError(f"SLURM_PROCID is set but {name} is missing; start the tasks with srun")
        local_world = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split("(")[0]
        return DistributedEnv(rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID"),
                              world_size=_int(env, "SLURM_NTASKS"),
                              local_world_size=int(local_world) if local_world.isdigit() else 1,
                              master_addr=env.get("MASTER_ADDR") or _slurm_master(env),
                              master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)), launcher="slurm")
    return DistributedEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                          master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=int(env.get("MASTER_PORT", _free_port())), launcher="single")


def torch_threads(*, cores: int, local_world_size: int, num_workers: int) -> int:
    """Torch's intra-op threads for one rank: its share of the cores, less one per data worker
    (each decodes on a core of its own), at least one. Torch's own default is every core, which
    on a busy 2-core machine fought the workers: 60 steps took 156 s instead of 13 s."""
    return max(1, cores // max(1, local_world_size) - num_workers)


def set_torch_threads(*, num_workers: int, local_world_size: int, log=None) -> int | None:
    """Set torch's thread count where the user has not (``OMP_NUM_THREADS`` unset), and log it.
    Returns the count chosen, or None where the user's setting stands."""
    import logging

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch_threads(cores=cores, local_world_size=local_world_size, num_workers=num_workers)
    torch.set_num_threads(threads)
    (log or logging.getLogger(__name__)).info(
        "torch threads: %d (%d cores, %d rank(s) on this machine, %d data worker(s) each); set OMP_NUM_THREADS "
        "to choose", threads, cores, local_world_size, num_workers)
    return threads


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
