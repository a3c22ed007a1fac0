"""Imported once by the DataLoader workers' fork server (``worker.SERVER_PRELOAD``): its workers
are forked with torch and the data pipeline already loaded, and the server, like the workers,
leaves stop signals to the trainer (Slurm may signal every process of the job; a server killed
by SIGTERM could start no further workers, e.g. for the evaluation after the save)."""
from pipeline.data import loader  # noqa: F401  (the modules the workers run)
from pipeline.data.worker import ignore_stop_signals

ignore_stop_signals()
