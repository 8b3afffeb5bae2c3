"""``headrace fit-hash``: fit a new id-mapping version from the cache's id statistics and
the current model, plus the pieces ``serve`` uses to re-fit periodically and to migrate
embedding rows at a version boundary.

Flow of one fit (``fit_from_cache``); this module only orchestrates:

1. read each sparse feature's id statistics from the cache (``storage.id_stats``);
2. load the current mapping set (``storage.mapping_store``: the newest version, or the
   config's default mapper as version 0) and the embedding tables of the newest
   checkpoint with the mapping version they were trained under (``trainer.migrate``);
3. fit one mapper per feature (``transforms.hash_fit.fit_mapping_set``: ``[hash] fit``,
   learned or frequency; features with fewer than ``min_events_to_fit`` counted events
   keep their current mapper);
4. save the set as version ``current + 1`` (atomic, immutable) and report per feature:
   distinct ids, collisions, bucket mass balance, fit seconds.

The pipeline's ``ProcessBatches`` picks up the new version for batches it processes from
then on; each cached batch records its version, and the trainer migrates rows when it
reaches the first batch of the new version (``migration_hook``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from engine.config import HeadraceConfig
from engine.errors import MappingError
from storage.batch_cache import BatchCache
from storage.id_stats import read_id_stats
from storage.mapping_store import MappingStore
from storage.migration_stats import load_migration_stats, save_migration_stats
from trainer.migrate import checkpoint_tables, migrate_model
from transforms.hash_fit import IdStats, fit_mapping_set
from transforms.mappers import MappingSet

__all__ = ["mapping_store", "current_mappings", "cache_id_stats", "fit_from_cache", "RefitScheduler",
           "migration_hook"]


def mapping_store(cfg: HeadraceConfig) -> MappingStore:
    """The configured mapping store (``[hash] mappings_dir`` or ``<cache.path>/mappings``)."""
    return MappingStore.from_config(cfg.hash, cfg.cache)


def current_mappings(cfg: HeadraceConfig) -> MappingSet:
    """The newest stored mapping set, or the config's default mapper as version 0."""
    return mapping_store(cfg).load_or_default(cfg.schema, cfg.hash.mapper)


def cache_id_stats(cfg: HeadraceConfig, cache: BatchCache | None = None
                   ) -> tuple[dict[str, IdStats], dict[str, Any]]:
    """Every feature's ``IdStats`` and the statistics' summary, from one read snapshot of
    ``cache``, or of the configured cache opened read-only for the call."""
    opened = BatchCache.from_config(cfg.cache, readonly=True) if cache is None else contextlib.nullcontext(cache)
    with opened as c:
        return read_id_stats(c, cfg.schema, cfg.hash)


def fit_from_cache(cfg: HeadraceConfig, *, cache: BatchCache | None = None) -> dict[str, Any]:
    """Fit and save a new mapping version from what the cache has ingested (the library
    function behind ``headrace fit-hash --config C``). Returns the JSON-ready report:
    ``{"version", "path", "fit_s", "features": {feature: report}, "stats": summary}``.
    Raises ``MappingError`` when no feature had enough events to fit."""
    t0 = time.perf_counter()
    stats, summary = cache_id_stats(cfg, cache)
    store = mapping_store(cfg)
    current = store.load_or_default(cfg.schema, cfg.hash.mapper)
    tables, trained_version = checkpoint_tables(cfg.train_spec())
    tables_mapping = current
    if tables and trained_version is not None and trained_version != current.version:
        try:
            tables_mapping = store.load_or_default(cfg.schema, cfg.hash.mapper, version=trained_version)
        except MappingError:
            tables = {}  # the checkpoint's mapping is gone: fit from statistics alone
    new, report = fit_mapping_set(cfg.schema, cfg.hash, stats, current, tables, tables_mapping)
    if not any(r.get("fitted") for r in report.values()):
        raise MappingError(
            f"fit-hash: no feature has {cfg.hash.min_events_to_fit} counted events yet "
            f"(counted: { {f: r['events'] for f, r in report.items()} }); ingest more, or lower "
            "[hash] min_events_to_fit"
        )
    # the counts this version is fitted on, pinned for every migration to it (saved first:
    # a stored mapping version always has them)
    save_migration_stats(store, new.version, {f: (s.ids, s.counts) for f, s in stats.items()})
    path = store.save(new)
    pruned = store.prune(cfg.hash.keep_mappings, _oldest_needed_version(cfg, cache, trained_version))
    return {"version": new.version, "path": path, "fit_s": round(time.perf_counter() - t0, 4),
            "features": report, "stats": summary, "pruned_versions": pruned}


def _oldest_needed_version(cfg: HeadraceConfig, cache: BatchCache | None, trained_version: int | None) -> int | None:
    """The oldest mapping version a reader may still ask for: the trainer's checkpoint's, or
    the oldest cached batch's (a trainer behind the cache migrates from it)."""
    opened = BatchCache.from_config(cfg.cache, readonly=True) if cache is None else contextlib.nullcontext(cache)
    with opened as c:
        cached = c.oldest_mapping_version()
    known = [v for v in (trained_version, cached) if v is not None]
    return min(known) if known else None


class RefitScheduler:
    """Periodic re-fit for ``serve``: ``maybe_refit()`` fits a new version when
    ``[hash] refit_every_s`` seconds passed since the last fit (or since construction), and
    returns its report; otherwise None. Too little data (``MappingError`` from the fit) is
    reported as ``{"skipped": reason}`` and retried at the next period. ``clock`` is
    injectable for tests."""

    def __init__(self, cfg: HeadraceConfig, cache: BatchCache | None = None, clock=time.monotonic):
        if cfg.hash.refit_every_s <= 0:
            raise MappingError("RefitScheduler needs [hash] refit_every_s > 0")
        self.cfg, self.cache, self.clock = cfg, cache, clock
        self.last_s = clock()

    def maybe_refit(self) -> dict[str, Any] | None:
        now = self.clock()
        if now - self.last_s < self.cfg.hash.refit_every_s:
            return None
        self.last_s = now
        try:
            return fit_from_cache(self.cfg, cache=self.cache)
        except MappingError as exc:
            return {"skipped": str(exc)}


def migration_hook(cfg: HeadraceConfig, cache: BatchCache | None = None):
    """An ``on_mapping_change`` hook for ``trainer.loop.ContinuousTrainer``: loads the old
    and new mapping sets from the mapping store and the id statistics the new version was
    fitted on (``storage.migration_stats``: the same on every rank and on every run, so the
    boundary resumes exactly like any other step; for a version saved without them, the
    cache's current statistics, from ``cache`` or a read-only one opened per call) and
    migrates rows and optimizer state (``trainer.migrate.migrate_model``, wherever the rows
    live). ``hook.reports`` collects what each call moved."""
    store = mapping_store(cfg)
    reports: list[dict[str, Any]] = []

    def hook(old_version: int, new_version: int, model, optimizer) -> None:
        old, new = (store.load_or_default(cfg.schema, cfg.hash.mapper, version=v) for v in (old_version, new_version))
        stats = load_migration_stats(store, new_version)
        pinned = stats is not None
        if not pinned:
            live, _ = cache_id_stats(cfg, cache)
            stats = {f: (s.ids, s.counts) for f, s in live.items()}
        t0 = time.perf_counter()
        moved = migrate_model(model, optimizer, old.mappers, new.mappers, stats)
        reports.append({"from": old_version, "to": new_version, "features": moved, "pinned_stats": pinned,
                        "migrate_s": round(time.perf_counter() - t0, 4)})

    hook.reports = reports
    return hook
