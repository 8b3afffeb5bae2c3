"""Live progress on stderr (results go to stdout as JSON): a status line on a terminal, a
periodic log line otherwise.

On a terminal (stderr is a TTY) one line is rewritten in place, at most every 0.2 s. Anywhere
else (a file, a pipe, systemd's journal) rewriting makes no sense, so the same text goes out
as an INFO record of the ``headrace.progress`` logger every ``log_every_s`` seconds, in the
log format in force (``--log-format json``: the numbers passed as ``fields`` are in the
record's ``"fields"``).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from engine.logs import PROGRESS_LOGGER

__all__ = ["ProgressLine", "format_rate", "LOG_EVERY_S"]

#: Seconds between progress log lines when stderr is not a terminal.
LOG_EVERY_S = 10.0

_log = logging.getLogger(PROGRESS_LOGGER)


def format_rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class ProgressLine:
    """Rewrites one status line on a terminal; logs it every ``log_every_s`` otherwise."""

    def __init__(self, stream=None, log_every_s: float = LOG_EVERY_S, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = 0.2 if self.tty else log_every_s
        self.enabled = enabled
        # -inf, not 0: monotonic() counts from boot, so on a host up for less than every_s
        # a 0 would hide the first line.
        self._last = float("-inf")
        self._width = 0

    def update(self, text: str, force: bool = False, fields: dict[str, Any] | None = None) -> None:
        """Show ``text`` (``force``: even if the last one was shown just now). ``fields``: the
        numbers behind it, for JSON log lines."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        if not self.tty:
            _log.info(text, extra={"fields": fields} if fields else None)
            return
        pad = max(self._width - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self._width = len(text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
