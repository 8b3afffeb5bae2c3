"""``headrace train``: the trainer alone on an existing cache (``--follow`` keeps waiting).

One plain process trains the configured model (``trainer.loop.ContinuousTrainer``). Under
``torchrun`` (``WORLD_SIZE`` set), or with ``[sharding] enabled``, every process is one rank
of a sharded job (``trainer.distributed_loop.DistributedTrainer``): embedding tables placed
by the planner (``headrace plan`` prints the same plan), dense layers data-parallel, each rank
training on its slice of every batch read from the same cache. A multi-rank job needs
``[sharding] enabled = true``.

Example::

    headrace serve -c C --no-train &                      # ingest into the cache
    torchrun --standalone --nproc-per-node 2 -m engine train -c C --follow --json
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

from engine.config import HeadraceConfig
from engine.errors import CacheError
from engine.processes import install_stop_signals
from trainer.history import MetricsRecorder

__all__ = ["train", "launched_by_torchrun", "PROGRESS_EVERY_S"]

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """True in a process ``torchrun`` started (it sets ``WORLD_SIZE`` for each rank)."""
    return "WORLD_SIZE" in os.environ


def train(cfg: HeadraceConfig, *, follow: bool = False,
          on_progress: Callable[[dict[str, Any]], None] | None = None,
          handle_signals: bool = True, stop: Callable[[], bool] | None = None,
          on_mapping_change: Callable[..., None] | None = None, endpoint: bool = True,
          lag: Callable[[], int | None] | None = None) -> dict | None:
    """Train from the cache's current position (or the last checkpoint); returns the summary
    ``{"trained_samples", "auc", "logloss", "samples_per_s", ...}``. SIGINT/SIGTERM (with
    ``handle_signals``) or ``stop()`` turning true stop it after the current step with a
    checkpoint (under ``torchrun``, signal ``torchrun``: it forwards the signal to every rank
    and they stop together). ``on_mapping_change``: see ``trainer.loop.MappingChangeHook``
    (default: migrate rows with ``engine.fit_hash.migration_hook``).

    In a sharded job only rank 0 returns the summary (it adds ``world_size`` and ``plan``) and
    calls ``on_progress``; the other ranks return None, so the job prints one result.

    ``endpoint``: serve ``[metrics]`` from this process (rank 0 only; ``serve``'s trainer child
    passes False and reports to its supervisor instead); the summary then adds
    ``metrics_address``. Progress is reported at least every ``PROGRESS_EVERY_S`` seconds.

    History: rank 0 records its progress into the model's metrics history (and TensorBoard,
    ``[trainer] tensorboard_dir``) with ``trainer.history.MetricsRecorder``, adding the
    cache's counters and, when the caller knows it, ``lag()`` (``serve`` does)."""
    import torch

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)

    signalled = threading.Event()
    if handle_signals and threading.current_thread() is threading.main_thread():
        install_stop_signals(signalled.set)
    user_stop = stop

    def stopped() -> bool:
        return signalled.is_set() or (user_stop is not None and user_stop())

    if on_mapping_change is None:
        # Crossing a mapping version without migrating rows would read new rows with old
        # embeddings; the default hook migrates them (engine.fit_hash.migration_hook).
        from engine.fit_hash import migration_hook

        on_mapping_change = migration_hook(cfg)
    main = os.environ.get("RANK", "0") == "0"
    serves = endpoint and cfg.metrics.address is not None and main
    cache = _ReadonlyAfterTrainer(cfg)
    # Built before training: a missing tensorboard package fails here, not mid-run.
    recorder = MetricsRecorder(cfg, service=_service_numbers(cache, lag)) if main else None
    reporter = None
    if serves:
        from engine.metrics import TrainerReporter

        reporter = TrainerReporter(None)

    def report(status: dict[str, Any]) -> None:
        cache.trainer_started = True
        if reporter is not None:
            reporter.report(status)
        if recorder is not None:
            recorder.observe(status)
        if on_progress is not None:
            on_progress(status)

    address = None
    try:
        if serves:
            from engine.health import open_endpoint

            with open_endpoint(cfg, "train", cache=cache, trainer_reporter=reporter) as ep:
                summary = _train(cfg, follow=follow, stop=stopped, on_progress=report,
                                 on_mapping_change=on_mapping_change)
            address = ep.address
        else:
            summary = _train(cfg, follow=follow, stop=stopped, on_progress=report,
                             on_mapping_change=on_mapping_change)
        if summary is not None and recorder is not None:
            recorder.record(summary, final=True)
    finally:
        if recorder is not None:
            recorder.close()
        cache.close()
    if summary is not None and endpoint:
        summary["metrics_address"] = address
    return summary


def _service_numbers(cache: "_ReadonlyAfterTrainer", lag: Callable[[], int | None] | None
                     ) -> Callable[[], dict[str, Any]]:
    """What the history records of the service around the trainer: the cache's lifetime
    read and dead-letter counters, and the consumer lag when ``lag`` knows it."""

    def numbers() -> dict[str, Any]:
        out: dict[str, Any] = {}
        view = cache()
        if view is not None:
            try:
                counts = view.counts()
            except CacheError as exc:  # the history goes without them; training must not stop
                log.debug("history: cache counts not readable: %s", exc)
            else:
                out["cache_read"], out["dead_letters"] = counts["read"], counts["dead_letters"]
        if lag is not None:
            out["lag"] = lag()
        return out

    return numbers


class _ReadonlyAfterTrainer:
    """The endpoint's and the history's read-only view of the cache, opened once the trainer
    has reported (``trainer_started``): the trainer opens the cache writable first (a process
    must open it writable before read-only)."""

    def __init__(self, cfg: HeadraceConfig):
        self.cfg = cfg
        self.trainer_started = False
        self._cache = None
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            if self._cache is None and self.trainer_started:
                from storage.batch_cache import BatchCache

                try:
                    self._cache = BatchCache.from_config(self.cfg.cache, readonly=True)
                except CacheError as exc:
                    log.debug("metrics: cache not readable yet: %s", exc)
            return self._cache

    def close(self) -> None:
        with self._lock:
            if self._cache is not None:
                self._cache.close()
                self._cache = None


#: Seconds between progress reports at most (also every 50 batches): what metrics and
#: readiness see of the trainer.
PROGRESS_EVERY_S = 1.0


def _train(cfg: HeadraceConfig, **kwargs: Any) -> dict | None:
    kwargs["progress_every_s"] = PROGRESS_EVERY_S
    if launched_by_torchrun() or cfg.sharding.enabled:
        return _train_sharded(cfg, **kwargs)
    from trainer.loop import ContinuousTrainer

    return ContinuousTrainer(cfg, cfg.cache.path, **kwargs).run()


def _train_sharded(cfg: HeadraceConfig, **kwargs: Any) -> dict | None:
    import torch.distributed as dist

    from engine.errors import ConfigError
    from trainer.dist import init_from_env
    from trainer.distributed_loop import DistributedTrainer, require_sharding_for

    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with "
                          "torchrun, which sets it") from None
    require_sharding_for(cfg, world_size)  # before joining: every rank fails alike, no hang
    if not cfg.sharding.enabled:
        # torchrun with one process and sharding off: nothing to distribute.
        from trainer.loop import ContinuousTrainer

        return ContinuousTrainer(cfg, cfg.cache.path, **kwargs).run()
    ctx = init_from_env(cfg.trainer.device)
    if ctx.rank != 0:
        kwargs["on_progress"] = None
    try:
        summary = DistributedTrainer(cfg, cfg.cache.path, ctx=ctx, **kwargs).run()
    finally:
        # Also tears down the one-process group build_sharded_embeddings makes without torchrun.
        if dist.is_initialized():
            dist.destroy_process_group()
    return summary if ctx.rank == 0 else None
