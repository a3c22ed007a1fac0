"""The errors a user can fix (config, data, checkpoint, environment) and how they end a run."""
from __future__ import annotations

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.distributed.env import DistributedEnvError


def _data_error():
    try:
        from pipeline.data import DataError
    except ImportError:  # the data package failed to import: let that error surface on its own
        return ConfigError
    return DataError


USER_ERRORS = (ConfigError, CheckpointError, DistributedEnvError, _data_error())


def one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


def exit_code_for(error: BaseException) -> int:
    """2 for a mistake the user can fix, 130 for Ctrl-C, 1 for everything else."""
    if isinstance(error, USER_ERRORS):
        return 2
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1
