"""Logging setup shared by the CLI and its child processes."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

# Beam logs this on import when the optional GCP client libraries are absent; headrace
# never uses them, so it is noise on every command.
_NOISE = ("apitools not found",)


def _not_noise(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not any(n in msg for n in _NOISE)


def configure_logging(level: int) -> None:
    """Log to stderr at ``level``, without known third-party noise."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    if _not_noise not in root.filters:
        root.addFilter(_not_noise)
