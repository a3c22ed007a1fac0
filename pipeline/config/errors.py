"""The configuration's one exception, and the check every section uses to raise it."""
from __future__ import annotations

from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A user's configuration mistake; the message is one line naming the key and the fix."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
