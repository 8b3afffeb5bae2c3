"""Child processes of a service: started with 'spawn', killed with their parent.

``serve`` runs the Beam pipeline and the trainer in two child processes so that neither
holds the other's GIL and each can be stopped on its own. Children ask the kernel to
SIGKILL them when the parent dies (``PR_SET_PDEATHSIG``), so a supervisor killed with
SIGKILL never leaves an orphan writing to the cache.

Stopping is cooperative and file-based (``StopFile``): the same mechanism works across
processes, survives no shared memory, and is what the Kafka source polls.

Signals: children ignore SIGINT and SIGTERM from their first instruction on (the ignore is
set in the parent while it starts them, and an ignored signal stays ignored across exec),
so a signal to the whole process group (Ctrl-C, systemd's ``KillMode=control-group``)
reaches only the supervisor's handler, which stops the children in order through their
stop files. A child that fails with a headrace error writes ``error_report`` to its error
file and exits with that error's exit code, so the supervisor can raise the same error.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, Callable

import orjson

from engine.errors import HEADRACE_ERRORS, error_from_report, error_report, exit_code_of
from engine.logs import configure_logging, current_format

__all__ = ["StopFile", "spawn_child", "child_failure", "install_stop_signals", "STOP_SIGNALS"]

#: The signals that ask a service to stop (once: gracefully; twice: fast).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

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


def _child_main(parent_pid: int, log_level: int, log_format: str, error_path: str | None,
                payload: bytes) -> None:
    # The supervisor owns SIGINT/SIGTERM: children stop through their StopFile. (Already
    # ignored since exec, see spawn_child; set again in case a library reset them.)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    # Logging first, then the target and its arguments: unpickling them imports their modules
    # (Beam among them), whose import-time log lines must come out in this process's format.
    configure_logging(log_level, log_format, replace=True)
    target, args = pickle.loads(payload)
    try:
        target(*args)
    except HEADRACE_ERRORS as exc:
        if error_path:
            Path(error_path).write_bytes(orjson.dumps(error_report(exc)))
        kind = "retriable " if exc.retriable else ""
        log.error("%s: %s%s: %s", mp.current_process().name, kind, type(exc).__name__, exc)
        sys.exit(exit_code_of(exc))


def spawn_child(name: str, target: Callable[..., Any], *args: Any, error_path: str | None = None) -> mp.Process:
    """Start ``target(*args)`` in a fresh interpreter that dies with this process, ignores
    SIGINT/SIGTERM from its start and logs as this one does (level and format). A headrace
    error ending it is written as ``engine.errors.error_report`` JSON to ``error_path`` (when
    given)."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        name=name, target=_child_main,
        args=(os.getpid(), logging.getLogger().getEffectiveLevel(), current_format().value, error_path,
              pickle.dumps((target, args))),
        daemon=False,
    )
    # multiprocessing's resource tracker unblocks SIGINT/SIGTERM when it first starts: start
    # it before blocking them here.
    resource_tracker.ensure_running()
    # Signals arriving while the child starts stay pending (blocked) and reach this process's
    # handlers afterwards; the child inherits the ignore.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pending = signal.sigpending()  # setting SIG_IGN would discard these: replay them
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            proc.start()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for sig in STOP_SIGNALS:
        if sig in pending:
            signal.raise_signal(sig)
    return proc


def child_failure(proc: mp.Process, error_path: str, what: str, fallback: type[Exception],
                  when: str = "") -> Exception:
    """The error a child reported in ``error_path`` before exiting (same class, so the same
    exit code, its message prefixed with ``what``), or ``fallback`` naming its exit code."""
    try:
        report = orjson.loads(Path(error_path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        report = None
    exc = error_from_report(report, what) if report else None
    return exc or fallback(f"{what} exited with code {proc.exitcode}{when}; see its log above")


def install_stop_signals(on_stop: Callable[[], None], on_force: Callable[[], None] | None = None) -> None:
    """Call ``on_stop`` on the first SIGINT/SIGTERM (a graceful stop: flush, checkpoint,
    exit 0) and ``on_force`` on any later one (a fast stop; without ``on_force`` it raises
    KeyboardInterrupt). Must be called from the main thread."""
    state = {"count": 0}

    def handler(signum, _frame):
        state["count"] += 1
        name = signal.Signals(signum).name
        if state["count"] > 1:
            log.warning("signal %s again: stopping fast (no final flush or checkpoint; the next run "
                        "resumes from the last checkpoint and the cache's offsets)", name)
            if on_force is None:
                raise KeyboardInterrupt
            on_force()
            return
        log.warning("signal %s: stopping (stop reading, flush, checkpoint, exit); send it again to "
                    "stop fast", name)
        on_stop()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
