"""Every error headrace raises on purpose, and the one place that maps them to exit codes.

Each package declares its own errors next to its code (``streams.errors``,
``transforms.errors``, ``storage.errors``, ``trainer.errors``); ``engine`` adds
``ConfigError`` for the TOML file and the CLI, and maps each class to an exit code here.
Every class carries ``retriable``: True when the same call may succeed later without a
change by the user (a broker not reachable yet, a full map being grown), False when
something must change first (bad config, corrupt file).
"""

from __future__ import annotations

from storage.errors import CacheError, CheckpointError, DiskFullError, DiskReserveError, StorageError
from streams.errors import BrokerError, SourceConfigError, SourceError
from trainer.errors import FeedError, PlanError, TrainerConfigError, TrainerError
from transforms.errors import MappingError, PluginError, TransformConfigError, TransformError

__all__ = [
    "ConfigError", "HEADRACE_ERRORS", "exit_code_of",
    "SourceError", "BrokerError", "SourceConfigError",
    "TransformError", "TransformConfigError", "MappingError", "PluginError",
    "StorageError", "CacheError", "CheckpointError", "DiskFullError", "DiskReserveError",
    "error_from_report", "error_report",
    "TrainerError", "TrainerConfigError", "PlanError", "FeedError",
]


class ConfigError(Exception):
    """Config file or CLI arguments are invalid; the message names the key and the file."""

    retriable = False


# Every error class a headrace component raises on purpose; ``except HEADRACE_ERRORS``
# is the catch-all of the CLI and the supervisors.
HEADRACE_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, SourceError, TransformError, StorageError, TrainerError,
)

# Most specific first: the first class an error is an instance of decides its exit code.
_EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (ConfigError, 2),
    (SourceConfigError, 2),
    (TransformConfigError, 2),
    (TrainerConfigError, 2),
    (PluginError, 2),
    (SourceError, 3),
    (FeedError, 3),  # a trainer's feed is its source
    (DiskFullError, 8),
    (CacheError, 4),
    (CheckpointError, 4),
    (StorageError, 4),
    (PlanError, 6),
    (TrainerError, 5),
    (MappingError, 7),
    (TransformError, 2),
)


def exit_code_of(exc: BaseException) -> int:
    """The CLI's exit code for ``exc``: 2 config/plugin, 3 source (a feed too), 4 cache/checkpoint,
    5 trainer, 6 plan, 7 mapping, 8 disk full, 1 anything else."""
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def _classes(root: type[Exception]) -> dict[str, type[Exception]]:
    out = {root.__name__: root}
    for sub in root.__subclasses__():
        out.update(_classes(sub))
    return out


def error_report(exc: BaseException) -> dict:
    """What a child process tells its supervisor about the error that ended it (JSON-ready):
    the class name, message, ``retriable`` and exit code."""
    fields = {k: v for k, v in vars(exc).items() if isinstance(v, (str, int, float, bool)) and k != "retriable"}
    return {"kind": type(exc).__name__, "message": str(exc), "retriable": bool(getattr(exc, "retriable", False)),
            "exit_code": exit_code_of(exc), "fields": fields}


def error_from_report(report: dict, where: str) -> Exception | None:
    """The supervisor's copy of a child's error (same class, so the same exit code), its
    message prefixed with ``where``; None when the class is not a headrace error."""
    known: dict[str, type[Exception]] = {}
    for root in HEADRACE_ERRORS:
        known.update(_classes(root))
    cls = known.get(report.get("kind", ""))
    if cls is None:
        return None
    exc = cls.__new__(cls)
    Exception.__init__(exc, f"{where}: {report.get('message', '')}")
    for key, value in (report.get("fields") or {}).items():
        setattr(exc, key, value)
    exc.retriable = bool(report.get("retriable", False))
    return exc
