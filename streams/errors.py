"""Errors raised by ``streams``: sources, the embedded broker, producers and offsets.

Every error carries ``retriable``: True when the same call may succeed later without a
change by the user (a broker not reachable yet), False when something must change first.
Exit codes are not decided here: ``engine.errors`` maps each class to one.
"""

from __future__ import annotations

__all__ = ["SourceError", "BrokerError", "SourceConfigError"]


class SourceError(Exception):
    """Reading from Kafka or a replay file failed (retriable unless said otherwise)."""

    retriable: bool = True

    def __init__(self, message: str, *, retriable: bool | None = None):
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class BrokerError(SourceError):
    """The embedded broker could not be started or stopped."""


class SourceConfigError(SourceError):
    """A source was asked for something that cannot work (unknown client option, a bad
    offset range, a file listed twice); the message names the key and the fix."""

    retriable = False
