"""The one exception hierarchy of headrace.

Every error carries ``retriable``: True when the same call may succeed later without a
change by the user (a broker not reachable yet, a full map being grown), False when
something must change first (bad config, corrupt file). The CLI maps the classes to
exit codes in one place (``engine.cli``).
"""

from __future__ import annotations

__all__ = [
    "HeadraceError",
    "ConfigError",
    "PluginError",
    "SourceError",
    "BrokerError",
    "DecodeError",
    "CacheError",
    "CheckpointError",
    "TrainerError",
    "PlanError",
    "MappingError",
]


class HeadraceError(Exception):
    """Base of every error headrace raises on purpose."""

    retriable: bool = False
    exit_code: int = 1

    def __init__(self, message: str, *, retriable: bool | None = None):
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(HeadraceError):
    """Config file or CLI arguments are invalid; the message names the key and the file."""

    exit_code = 2


class PluginError(HeadraceError):
    """A user transform named in config cannot be loaded or has the wrong type."""

    exit_code = 2


class SourceError(HeadraceError):
    """Reading from Kafka or a replay file failed."""

    retriable = True
    exit_code = 3


class BrokerError(SourceError):
    """The embedded broker could not be started or stopped."""


class DecodeError(HeadraceError):
    """An event could not be decoded. Raised only where no dead-letter path exists."""


class CacheError(HeadraceError):
    """The LMDB batch cache or dead-letter store is unusable or inconsistent."""

    exit_code = 4


class CheckpointError(HeadraceError):
    """A checkpoint could not be written or does not match the model being restored."""

    exit_code = 4


class TrainerError(HeadraceError):
    """Training cannot proceed (shape mismatch, non-finite loss, bad device)."""

    exit_code = 5


class PlanError(HeadraceError):
    """No sharding plan fits; the message says by how much and what would make it fit."""

    exit_code = 6


class MappingError(HeadraceError):
    """An id mapping cannot be fitted, loaded or applied."""

    exit_code = 7
