"""Child processes of a service: started with 'spawn', killed with their parent.

``serve`` runs the Beam pipeline and the trainer in two child processes so that neither
holds the other's GIL and each can be stopped on its own. Children ask the kernel to
SIGKILL them when the parent dies (``PR_SET_PDEATHSIG``), so a supervisor killed with
SIGKILL never leaves an orphan writing to the cache.

Stopping is cooperative and file-based (``StopFile``): the same mechanism works across
processes, survives no shared memory, and is what the Kafka source polls.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from engine.logs import configure_logging

__all__ = ["StopFile", "spawn_child", "install_stop_signals"]

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


class StopFile:
    """A stop request visible to every process that knows the path."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)

    def request(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).touch()

    def requested(self) -> bool:
        return os.path.exists(self.path)

    def clear(self) -> None:
        Path(self.path).unlink(missing_ok=True)

    __call__ = requested


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child_main(parent_pid: int, log_level: int, target: Callable[..., Any], args: tuple) -> None:
    _die_with_parent(parent_pid)
    # The supervisor owns SIGINT/SIGTERM handling: children stop through their StopFile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(log_level)
    target(*args)


def spawn_child(name: str, target: Callable[..., Any], *args: Any) -> mp.Process:
    """Start ``target(*args)`` in a fresh interpreter that dies with this process."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        name=name, target=_child_main,
        args=(os.getpid(), logging.getLogger().getEffectiveLevel(), target, args), daemon=False,
    )
    proc.start()
    return proc


def install_stop_signals(on_stop: Callable[[], None]) -> None:
    """Call ``on_stop`` on SIGINT/SIGTERM (once each; a second SIGINT raises KeyboardInterrupt)."""
    state = {"count": 0}

    def handler(signum, _frame):
        state["count"] += 1
        if state["count"] > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("signal %s: stopping (flush, checkpoint, exit)", signal.Signals(signum).name)
        on_stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
