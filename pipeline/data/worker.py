"""What every DataLoader worker process sets up before it reads its first sample."""
from __future__ import annotations

import multiprocessing
import signal

from pipeline.heap import keep_heap

# Modules the worker server imports once, so that each worker it forks starts with them loaded.
SERVER_PRELOAD = ["pipeline.data.worker_server"]


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


def worker_context(num_workers: int) -> multiprocessing.context.BaseContext | None:
    """Where DataLoader workers come from (None: no workers, nothing to start): a fork server,
    not the trainer itself.

    Forking the trainer (the default) copies a process with several threads (TensorBoard's
    writer, the DataLoaders' queue feeders, gloo's); under Python 3.11 a child forked while
    another thread held the interpreter's thread-list lock hung in ``PyOS_AfterFork_Child`` for
    good (seen here: evaluation workers, 4 hung runs in 48 runs of 60 evaluations each; the job
    then sat until the collective timeout; none in 28 such runs with the fork server). The fork
    server is a fresh single-threaded process started by fork+exec; workers are forked from it,
    with torch and this package already imported (``SERVER_PRELOAD``)."""
    return _fork_server() if num_workers > 0 else None


def _fork_server() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(SERVER_PRELOAD)  # read when the server starts
    return context


def start_worker_server(num_workers: int) -> None:
    """Start the fork server now (fork+exec, safe in any process), so that its imports overlap
    with building the model instead of delaying the first batch; nothing without workers."""
    from multiprocessing import forkserver

    if worker_context(num_workers) is not None:
        forkserver.ensure_running()
