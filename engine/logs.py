"""Logging setup shared by the CLI and its child processes: plain text or JSON lines.

``--log-format json`` (``LogFormat.JSON``) writes one JSON object per log line on stderr, for
log collectors: ``{"time" (UTC, ISO 8601, ms), "level", "logger", "process", "pid",
"message"}``, plus ``"fields"`` when the call passed ``extra={"fields": {...}}`` (the
periodic progress line does, ``engine.progress``) and ``"exception"`` with a traceback.
Python warnings are logged too (so every line stays JSON). Children started with
``engine.processes.spawn_child`` log in the format of their parent.
"""

from __future__ import annotations

import datetime as _dt
import enum
import logging
import sys

import orjson

__all__ = ["configure_logging", "LogFormat", "JsonFormatter", "current_format", "PROGRESS_LOGGER"]

#: The logger of the periodic progress line (``engine.progress``): at INFO, shown by default.
PROGRESS_LOGGER = "headrace.progress"

_TEXT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"

# Beam logs this on import when the optional GCP client libraries are absent; headrace
# never uses them, so it is noise on every command.
_NOISE = ("apitools not found",)


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


_format = LogFormat.TEXT


def _not_noise(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not any(n in msg for n in _NOISE)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out["fields"] = fields
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS).decode()


def current_format() -> LogFormat:
    """The format ``configure_logging`` set up in this process (text until then)."""
    return _format


def configure_logging(level: int, fmt: LogFormat | str = LogFormat.TEXT, *, replace: bool = False) -> None:
    """Log to stderr at ``level`` in ``fmt``, without known third-party noise. Like
    ``logging.basicConfig``, it adds no handler when the root logger already has one, unless
    ``replace`` (a child process, which owns its logging: a library's import-time
    ``logging.warning`` may have installed a default handler already)."""
    global _format
    _format = LogFormat(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if _format is LogFormat.JSON else logging.Formatter(_TEXT))
    handler.addFilter(_not_noise)  # records of module loggers reach the handler, not root's filters
    logging.basicConfig(level=level, handlers=[handler], force=replace)
    root = logging.getLogger()
    root.setLevel(level)
    if _not_noise not in root.filters:
        root.addFilter(_not_noise)
    logging.getLogger(PROGRESS_LOGGER).setLevel(min(level, logging.INFO))
    if _format is LogFormat.JSON:
        logging.captureWarnings(True)
