"""The data layer's user error: data that cannot be read as configured (exit 2, one line)."""
from __future__ import annotations

from pipeline.errors import UserError


class DataError(UserError, RuntimeError):
    """Data that cannot be read as configured; the message names the shard, key or setting."""
