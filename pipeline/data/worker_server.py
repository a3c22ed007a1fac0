"""Imported once by the DataLoader workers' fork server (``worker.SERVER_PRELOAD``): its workers
are forked with torch and the data pipeline already loaded, and the server, like the workers,
leaves stop signals to the trainer (Slurm may signal every process of the job; a server killed
by SIGTERM could start no further workers, e.g. for the evaluation after the save).

The server ends with its trainer: when the trainer closes its end of the "alive" pipe (any exit,
kill -9 included; the workers let go of their copies, see worker.py), and, when the trainer's
main thread started it, at once through the parent-death signal.
"""
import os

from pipeline.data import eval_loader, loader  # noqa: F401  (the modules the workers run)
from pipeline.data.worker import SERVER_PARENT_VAR, ignore_stop_signals
from pipeline.lifetime import die_with_parent

ignore_stop_signals()
if os.environ.get(SERVER_PARENT_VAR) == str(os.getppid()):
    die_with_parent(os.getppid())
