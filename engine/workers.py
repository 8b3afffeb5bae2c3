"""Pipeline workers: ``[pipeline] workers = N`` pipeline processes on one host, each reading
the partitions (or files) its ``streams.assignment.Share`` owns, all writing to the host's
one cache.

The cache takes them as it takes one: LMDB lets one write transaction commit at a time across
processes, and each batch commits with its partition's next offset in one transaction.
Since each partition has exactly one worker, its offsets have one writer, and exactly-once
is the single process's. ``WorkerGroup`` runs the processes for ``serve`` and ``backfill``
as one child: alive while all run, failed when one fails.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from typing import Any, Callable, Sequence

from engine.config import HeadraceConfig
from engine.errors import ConfigError
from engine.logs import PROGRESS_LOGGER
from engine.processes import child_failure, spawn_child
from streams.assignment import Share

__all__ = ["WorkerGroup", "worker_shares", "worker_name", "plan_kafka_workers", "plan_file_workers"]

log = logging.getLogger(__name__)
#: The assignment is logged where the progress line goes: shown by default.
_notice = logging.getLogger(PROGRESS_LOGGER)


def worker_shares(cfg: HeadraceConfig) -> list[Share]:
    """One share per pipeline worker of this host (``[source] member``, ``[pipeline] workers``)."""
    return Share.for_member(cfg.source.member, workers=cfg.pipeline.workers).worker_shares()


def worker_name(kind: str, worker: int, workers: int) -> str:
    """``kind`` for a single worker, ``kind_w`` for worker w of several (metric-name safe)."""
    return kind if workers == 1 else f"{kind}_{worker}"


def plan_kafka_workers(cfg: HeadraceConfig, kind: str = "pipeline") -> dict[str, tuple[Share, dict[str, list[int]]]]:
    """``{worker name: (share, {topic: partitions})}`` of this host's workers that own a
    partition (I/O: metadata), logged (shown by default). ConfigError when the host owns none."""
    from streams.kafka_source import assigned_partitions, format_partitions

    every = assigned_partitions(cfg.source)
    plan: dict[str, tuple[Share, dict[str, list[int]]]] = {}
    for share in worker_shares(cfg):
        owned = [(topic, p) for topic, p in every if share.owns(p)]
        name = worker_name(kind, share.worker, share.workers)
        if not owned:
            log.warning("%s (%s) owns no partition: [pipeline] workers exceeds this host's partitions; "
                        "not started", name, share)
            continue
        _notice.info("assignment: %s (%s) reads %s", name, share, format_partitions(owned))
        by_topic: dict[str, list[int]] = {}
        for topic, p in owned:
            by_topic.setdefault(topic, []).append(p)
        plan[name] = (share, by_topic)
    if not plan:
        raise ConfigError(f"[source] member = {cfg.source.member!r} owns no partition of topics "
                          f"{list(cfg.source.topics)}: use fewer members or more partitions")
    return plan


def plan_file_workers(cfg: HeadraceConfig, paths: list[str]) -> list[list[str]]:
    """The files of each worker of this host that has any (file i as partition i: see
    ``streams.assignment``), logged; empty when this host's member owns none."""
    plan = [share.pick(paths) for share in worker_shares(cfg)]
    plan = [files for files in plan if files]
    if cfg.pipeline.workers > 1 or cfg.source.member != "0/1":
        for w, files in enumerate(plan):
            _notice.info("assignment: backfill worker %d of %d (member %s) reads %d file(s): %s", w, len(plan),
                         cfg.source.member, len(files), ", ".join(os.path.basename(f) for f in files))
    return plan


class WorkerGroup:
    """Child processes running ``target`` with one argument tuple each, started together.

    ``is_alive()``: every worker runs (``serve``: any exit before a stop is a failure);
    ``running()``: some worker runs and none failed (``backfill``: workers finish one by
    one). ``failure()`` is the error of the first worker that exited non-zero."""

    def __init__(self, procs: dict[str, mp.Process], error_paths: dict[str, str]):
        self.procs = procs
        self.error_paths = error_paths

    @classmethod
    def spawn(cls, kind: str, target: Callable[..., Any], args: Sequence[tuple], *, error_dir: str,
              names: Sequence[str] | None = None) -> "WorkerGroup":
        """Start ``target(*a)`` for each ``a`` in ``args``; worker names from ``names`` or
        ``worker_name(kind, i, len(args))``; each reports its error into ``error_dir``."""
        names = list(names) if names is not None else [worker_name(kind, i, len(args)) for i in range(len(args))]
        procs, errors = {}, {}
        for name, a in zip(names, args):
            errors[name] = os.path.join(error_dir, f"{name}.error")
            procs[name] = spawn_child(name, target, *a, error_path=errors[name])
        return cls(procs, errors)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    @property
    def pid(self) -> int:
        return self.pids[0]

    def is_alive(self) -> bool:
        return all(p.is_alive() for p in self.procs.values())

    def any_alive(self) -> bool:
        return any(p.is_alive() for p in self.procs.values())

    def running(self) -> bool:
        procs = self.procs.values()
        return any(p.is_alive() for p in procs) and not any(p.exitcode for p in procs)

    def join(self, timeout: float | None = None) -> None:
        """Wait for every worker (at most ``timeout`` seconds in all)."""
        for p in self.procs.values():
            p.join(timeout)
            if timeout is not None and p.is_alive():
                return

    def kill(self) -> None:
        """SIGKILL the workers still running and reap them."""
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join()

    def failure(self, what: str, fallback: type[Exception], when: str = "") -> Exception | None:
        """The first failed worker's error (``engine.processes.child_failure``), None if none
        exited non-zero; a worker that exited (0 included) when ``is_alive`` was expected is the
        caller's to report with ``exited()``."""
        for name, p in self.procs.items():
            if p.exitcode:
                return child_failure(p, self.error_paths[name], self._what(what, name), fallback, when)
        return None

    def exited(self, what: str, fallback: type[Exception], when: str = "") -> Exception | None:
        """The error of the first worker no longer running (failed or not), None if all run."""
        for name, p in self.procs.items():
            if not p.is_alive():
                return child_failure(p, self.error_paths[name], self._what(what, name), fallback, when)
        return None

    def _what(self, what: str, name: str) -> str:
        return what if len(self.procs) == 1 else f"{what} ({name})"

    def children(self) -> list[tuple[str, mp.Process]]:
        return list(self.procs.items())
