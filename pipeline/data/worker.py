"""What every DataLoader worker process sets up before it reads its first sample."""
from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading

from pipeline.heap import keep_heap
from pipeline.lifetime import die_with_parent, name_this_process

# Modules the worker server imports once, so that each worker it forks starts with them loaded.
SERVER_PRELOAD = ["pipeline.data.worker_server"]
# The trainer's pid, for its fork server: set when the trainer's main thread starts the server,
# the one case where the server may ask to die with its parent (see lifetime.py).
SERVER_PARENT_VAR = "PIPELINE_WORKER_SERVER_PARENT"


def ignore_stop_signals() -> None:
    """Workers leave stop signals to the trainer. Slurm signals the whole process group (and,
    with proctrack/cgroup, every process of the job), and Ctrl-C in a terminal signals the
    foreground process group: a worker killed by SIGTERM or SIGINT would take the run down before
    the trainer could save. The trainer ends its workers itself (close())."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def private_generator():
    """The ``generator`` of the training and evaluation DataLoaders. A DataLoader draws its workers'
    base seed when an iterator starts (each epoch, each evaluation), from the global torch RNG unless
    given its own; a resume starts its iterator at another point of that RNG's stream than the
    uninterrupted run did, and drop path, which draws from it, then masked other paths (measured:
    the losses after a resume differed from step 1 on). Workers seed themselves per sample, so this
    base seed is never used for data."""
    import torch

    return torch.Generator()


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the training and evaluation DataLoaders."""
    ignore_stop_signals()
    _end_with_the_server()
    keep_heap()


def _end_with_the_server() -> None:
    """A worker ends when its fork server does (the server, its parent, is single-threaded).
    It also lets go of the trainer's end of the server's "alive" pipe, which multiprocessing
    hands to every child it starts: while a worker held it, the server never saw its trainer
    die (kill -9) and lived on, and so did the worker."""
    die_with_parent(os.getppid())
    from multiprocessing import forkserver

    server = forkserver._forkserver  # noqa: SLF001 - the only handle on the inherited descriptor
    if server._forkserver_alive_fd is not None:  # noqa: SLF001
        try:
            os.close(server._forkserver_alive_fd)  # noqa: SLF001
        except OSError:
            pass
        server._forkserver_alive_fd = None  # noqa: SLF001


def worker_context(num_workers: int) -> multiprocessing.context.BaseContext | None:
    """Where DataLoader workers come from (None: no workers, nothing to start): a fork server,
    not the trainer itself.

    Forking the trainer (the default) copies a process with several threads (TensorBoard's
    writer, the DataLoaders' queue feeders, gloo's); under Python 3.11 a child forked while
    another thread held the interpreter's thread-list lock hung in ``PyOS_AfterFork_Child`` for
    good (seen here: evaluation workers, 4 hung runs in 48 runs of 60 evaluations each; the job
    then sat until the collective timeout; none in 28 such runs with the fork server). The fork
    server is single-threaded: a fork of the launcher taken before it had other threads
    (``start_worker_server(fork=True)``), else a fresh process started by fork+exec; workers are
    forked from it, with torch and this package already imported (``SERVER_PRELOAD``)."""
    return _fork_server() if num_workers > 0 else None


def _fork_server() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(SERVER_PRELOAD)  # read when the server starts
    return context


def start_worker_server(num_workers: int, *, fork: bool = False) -> None:
    """Start the fork server now, so that its start-up overlaps with building the model instead of
    delaying the first batch; nothing without workers, nothing if it runs already.

    ``fork``: the launcher's call, at the start of a rank, before the process group and the model
    exist. If no other thread runs yet, the server is then a fork of this process, with torch and
    the data pipeline loaded already, where a fresh interpreter spends ~4 s of CPU importing them
    again, per rank, at every start. Otherwise (threads running: see worker_context) it is started
    by fork+exec."""
    from multiprocessing import forkserver, resource_tracker

    if worker_context(num_workers) is None:
        return
    if threading.current_thread() is threading.main_thread():
        os.environ[SERVER_PARENT_VAR] = str(os.getpid())
    if fork and _single_threaded():
        resource_tracker.ensure_running()  # first, as ensure_running does, but as its own small interpreter
        with _server_forked_from_here():
            forkserver.ensure_running()
    else:
        forkserver.ensure_running()


def _single_threaded() -> bool:
    """No other Python thread: the hang a fork of the trainer risked was another Python thread
    holding the interpreter's thread-list lock (DECISIONS.md). torch's native pool threads, idle
    at this point, are not copied by a fork (nor are they in every DataLoader's default fork)."""
    return threading.active_count() == 1


@contextlib.contextmanager
def _server_forked_from_here():
    """multiprocessing starts its fork server with ``util.spawnv_passfds(python, [-c, command], fds)``;
    for the duration of ``ensure_running`` that becomes a fork whose child keeps only those
    descriptors and runs the same command (forkserver.main, which preloads ``SERVER_PRELOAD``: only
    the server module itself is new to it) and ends with it."""
    from multiprocessing import util

    def fork_passfds(path, args, passfds):
        pid = os.fork()
        if pid:
            return pid
        code = 0
        try:
            # The trainer's objects stay as they are: a collection here could finalize one and close
            # a descriptor number the server has since reused.
            gc.freeze()
            _close_all_but(set(passfds) | {0, 1, 2})
            name_this_process(b"data-server")  # its command line is the trainer's: `top` and `ps -e` tell them apart
            exec(args[-1], {"__name__": "__pipeline_worker_server__"})  # noqa: S102 - multiprocessing's own command
        except SystemExit as done:  # forkserver.main ends so when its trainer's "alive" pipe closes
            code = done.code if isinstance(done.code, int) else 0
        except BaseException:  # noqa: BLE001 - a server must never go on as a copy of the trainer
            code = 1
        finally:
            os._exit(code)

    spawn = util.spawnv_passfds
    util.spawnv_passfds = fork_passfds
    try:
        yield
    finally:
        util.spawnv_passfds = spawn


def _close_all_but(keep: set[int]) -> None:
    """What exec with close_fds does: the server must not hold the trainer's files, sockets or
    pipes (the write end of its own "alive" pipe among them: it would never see the trainer die)."""
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
