"""``headrace fit-hash``: fit a new id-mapping version from the cache's id statistics and
the current model, plus the pieces ``serve`` uses to re-fit periodically and to migrate
embedding rows at a version boundary.

Flow of one fit (``fit_from_cache``):

1. read each sparse feature's id statistics (``storage.id_stats``) from the cache;
2. load the current mapping set (highest version in the mappings directory, or the
   config's default mapper as version 0) and, when a checkpoint exists, the embedding
   tables of the newest one (with the mapping version they were trained under);
3. fit one mapper per feature (``[hash] fit``: learned or frequency; features with fewer
   than ``min_events_to_fit`` counted events keep their current mapper);
4. save the set as version ``current + 1`` (atomic, immutable) and report per feature:
   distinct ids, collisions, bucket mass balance, fit seconds.

The pipeline's ``ProcessBatches`` picks up the new version for batches it processes from
then on; each cached batch records its version, and the trainer migrates rows when it
reaches the first batch of the new version (``migration_hook``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import numpy as np
import torch

from engine.config import HeadraceConfig
from engine.config.hashing import FitKind
from engine.errors import MappingError
from storage.batch_cache import BatchCache
from storage.id_stats import HEAD_DB, META_DB, IdStatsStore
from trainer.checkpoint import CheckpointManager
from trainer.migrate import migrate_model
from transforms.hash_fit import (
    IdStats, LearnedFitParams, embedding_vectors, fit_frequency, fit_learned, mapping_report,
)
from transforms.mappers import IdMapper, MappingSet

__all__ = [
    "mappings_dir", "learned_params", "open_stats", "read_id_stats", "current_mappings",
    "checkpoint_tables", "fit_mappings", "fit_from_cache", "RefitScheduler", "migration_hook",
]


def mappings_dir(cfg: HeadraceConfig) -> str:
    """``[hash] mappings_dir`` or ``<cache.path>/mappings``: the rule of
    ``engine.pipeline.mappings_dir``, repeated so fit-hash does not import Beam."""
    return cfg.hash.mappings_dir or os.path.join(cfg.cache.path, "mappings")


def learned_params(cfg: HeadraceConfig) -> LearnedFitParams:
    h = cfg.hash
    return LearnedFitParams(hot_fraction=h.hot_fraction, reserve_fraction=h.reserve_fraction,
                            label_weight=h.label_weight, embedding_weight=h.embedding_weight,
                            embedding_components=h.embedding_components)


def open_stats(cache: BatchCache, cfg: HeadraceConfig) -> IdStatsStore:
    """The id-statistics store of ``cache`` (read side; ``IdStatsStore.attach`` is the
    write side, registered by the pipeline's cache writer)."""
    h = cfg.hash
    return IdStatsStore(cache.open_db(HEAD_DB), cache.open_db(META_DB), [s.name for s in cfg.schema.sparse],
                        cfg.schema.label, head_capacity=h.stats_head_capacity,
                        sketch_width=h.sketch_width, sketch_depth=h.sketch_depth)


def read_id_stats(cache: BatchCache, cfg: HeadraceConfig) -> tuple[dict[str, IdStats], dict[str, Any]]:
    """Every feature's ``IdStats`` and the store's summary, from one read snapshot."""
    store = open_stats(cache, cfg)
    with cache.reader() as r:
        txn = r.txn
        stats = {f: store.read(txn, f) for f in store.features}
        summary = store.summary(txn)
    return stats, summary


def current_mappings(cfg: HeadraceConfig) -> MappingSet:
    """The newest stored mapping set, or the config's default mapper as version 0."""
    directory = mappings_dir(cfg)
    if MappingSet.versions(directory):
        ms = MappingSet.load(directory)
        ms.check_schema(cfg.schema)
        return ms
    return MappingSet.default(cfg.schema, cfg.hash.mapper)


def checkpoint_tables(cfg: HeadraceConfig) -> tuple[dict[str, np.ndarray], int | None]:
    """Embedding tables ``{feature: float32 [rows, dim]}`` of the newest checkpoint and the
    mapping version they were trained under; ``({}, None)`` without a checkpoint or when
    the checkpoint's embeddings are kept by a sharded/cached collection."""
    latest = CheckpointManager(cfg.trainer.checkpoint_dir, cfg).latest()
    if latest is None:
        return {}, None
    blob = torch.load(latest, map_location="cpu", weights_only=True)
    state = blob.get("model", {})
    tables = {}
    for s in cfg.schema.sparse:
        w = state.get(f"embeddings.bags.{s.name}.weight")
        if w is not None:
            tables[s.name] = w.float().numpy()
    mv = blob.get("counters", {}).get("mapping_version")
    return tables, (None if mv is None else int(mv))


def _fit_one(kind: FitKind, stats: IdStats, rows: int, params: LearnedFitParams,
             embeddings: np.ndarray | None) -> IdMapper:
    if kind is FitKind.FREQUENCY:
        return fit_frequency(stats, rows, hot_fraction=params.hot_fraction, seed=params.seed)
    return fit_learned(stats, rows, params, embeddings)


def fit_mappings(cfg: HeadraceConfig, stats: Mapping[str, IdStats], current: MappingSet,
                 tables: Mapping[str, np.ndarray] | None = None,
                 tables_mapping: MappingSet | None = None) -> tuple[MappingSet, dict[str, Any]]:
    """Fit version ``current.version + 1`` (pure: no I/O). ``tables`` are the current
    model's embedding tables, trained under ``tables_mapping`` (default ``current``).
    Returns the new set and ``{feature: report}``."""
    params = learned_params(cfg)
    tables = tables or {}
    tables_mapping = tables_mapping or current
    mappers: dict[str, IdMapper] = {}
    report: dict[str, Any] = {}
    for s in cfg.schema.sparse:
        st = stats.get(s.name)
        events = 0.0 if st is None else float(st.counts.sum())
        if st is None or st.distinct == 0 or events < cfg.hash.min_events_to_fit:
            mappers[s.name] = current[s.name]
            report[s.name] = {"fitted": False, "events": events,
                              "reason": f"fewer than min_events_to_fit = {cfg.hash.min_events_to_fit} events"}
            continue
        t0 = time.perf_counter()
        emb = None
        if cfg.hash.fit is FitKind.LEARNED and s.name in tables and cfg.hash.embedding_weight > 0:
            emb = embedding_vectors(st.ids, tables_mapping[s.name], tables[s.name], params.embedding_components)
        mapper = _fit_one(cfg.hash.fit, st, s.rows, params, emb)
        fit_s = time.perf_counter() - t0
        mappers[s.name] = mapper
        rep = mapping_report(mapper, st)
        rep.update({"fitted": True, "mapper": mapper.name, "events": events, "fit_s": round(fit_s, 4),
                    "used_embeddings": emb is not None, "before": mapping_report(current[s.name], st)})
        report[s.name] = rep
    return MappingSet(current.version + 1, mappers), report


def fit_from_cache(cfg: HeadraceConfig, *, cache: BatchCache | None = None) -> dict[str, Any]:
    """Fit and save a new mapping version from what the cache has ingested (the library
    function behind ``headrace fit-hash --config C``). Returns the JSON-ready report:
    ``{"version", "path", "fit_s", "features": {feature: report}, "stats": summary}``.
    Raises ``MappingError`` when no feature had enough events to fit."""
    t0 = time.perf_counter()
    own = cache is None
    if own:
        cache = BatchCache.from_config(cfg.cache, readonly=True)
    try:
        stats, summary = read_id_stats(cache, cfg)
    finally:
        if own:
            cache.close()
    current = current_mappings(cfg)
    tables, trained_version = checkpoint_tables(cfg)
    tables_mapping = current
    if tables and trained_version is not None and trained_version != current.version:
        try:
            tables_mapping = MappingSet.load(mappings_dir(cfg), trained_version)
        except MappingError:
            tables = {}  # the checkpoint's mapping is gone: fit from statistics alone
    new, report = fit_mappings(cfg, stats, current, tables, tables_mapping)
    if not any(r.get("fitted") for r in report.values()):
        raise MappingError(
            f"fit-hash: no feature has {cfg.hash.min_events_to_fit} counted events yet "
            f"(counted: { {f: r['events'] for f, r in report.items()} }); ingest more, or lower "
            "[hash] min_events_to_fit"
        )
    path = new.save(mappings_dir(cfg))
    return {"version": new.version, "path": path, "fit_s": round(time.perf_counter() - t0, 4),
            "features": report, "stats": summary}


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
    and new mapping sets from the mappings directory, reads id statistics from the cache
    (``cache`` or a read-only one opened per call) and migrates rows and optimizer state
    (``trainer.migrate.migrate_model``). ``hook.reports`` collects what each call moved."""
    directory = mappings_dir(cfg)
    reports: list[dict[str, Any]] = []

    def load(version: int) -> MappingSet:
        if version == 0 and 0 not in MappingSet.versions(directory):
            return MappingSet.default(cfg.schema, cfg.hash.mapper)
        return MappingSet.load(directory, version)

    def hook(old_version: int, new_version: int, model, optimizer) -> None:
        old, new = load(old_version), load(new_version)
        c = cache if cache is not None else BatchCache.from_config(cfg.cache, readonly=True)
        try:
            stats, _ = read_id_stats(c, cfg)
        finally:
            if cache is None:
                c.close()
        t0 = time.perf_counter()
        moved = migrate_model(model, optimizer, old.mappers, new.mappers,
                              {f: (s.ids, s.counts) for f, s in stats.items()})
        reports.append({"from": old_version, "to": new_version, "features": moved,
                        "migrate_s": round(time.perf_counter() - t0, 4)})

    hook.reports = reports
    return hook
