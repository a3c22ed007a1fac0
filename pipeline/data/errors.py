"""The data layer's errors: data that cannot be read as configured (exit 2, one line), and a
store that stays unreachable for longer than the run's I/O bounds (exit 75: requeue me)."""
from __future__ import annotations

from pipeline.errors import PipelineError, UserError

EXIT_TEMPFAIL = 75  # BSD's EX_TEMPFAIL, as a stop signal's: the run may succeed when requeued


class DataError(UserError, RuntimeError):
    """Data that cannot be read as configured; the message names the shard, key or setting."""


class StoreUnavailable(PipelineError, RuntimeError):
    """Object storage did not answer within data.io_retries / data.io_timeout_s; the message names
    the shard, the byte offset and the last error. Exit 75: a requeued run resumes exactly."""

    exit_code = EXIT_TEMPFAIL
