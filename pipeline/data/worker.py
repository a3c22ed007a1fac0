"""What every DataLoader worker process sets up before it reads its first sample."""
from __future__ import annotations

import signal

from pipeline.heap import keep_heap


def ignore_stop_signals() -> None:
    """Workers leave stop signals to the trainer. Slurm signals the whole process group (and,
    with proctrack/cgroup, every process of the job): a worker killed by SIGTERM would take the
    run down before the trainer could save. The trainer ends its workers itself (close())."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the training and evaluation DataLoaders."""
    ignore_stop_signals()
    keep_heap()
