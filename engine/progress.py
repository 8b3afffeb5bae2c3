"""Human-readable live progress on stderr (results go to stdout as JSON)."""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressLine", "format_rate"]


def format_rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class ProgressLine:
    """Rewrites one status line on a terminal; prints a line every ``every_s`` otherwise."""

    def __init__(self, stream=None, every_s: float = 2.0, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s if not self.tty else 0.2
        self.enabled = enabled
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        if self.tty:
            pad = max(self._width - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
