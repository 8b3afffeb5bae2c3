"""engine.fit_hash: fit-hash from a cache's statistics, and serve's periodic re-fit schedule."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import config_from_dict
from engine.errors import MappingError
from engine.fit_hash import RefitScheduler, current_mappings, fit_from_cache, mapping_store
from storage.batch_cache import BatchCache
from storage.id_stats import IdStatsStore
from streams.synthetic import SyntheticSpec, generate_payloads, synthetic_config_dict
from transforms.process import TransformSpec, process_batch, source_batch

SPEC = SyntheticSpec(num_dense=1, num_sparse=2, cardinality=400, seed=3)


def make_cfg(tmp_path, **hash_cfg):
    doc = synthetic_config_dict(SPEC, rows=64, embedding_dim=4)
    doc["cache"] = {"path": str(tmp_path / "cache")}
    doc["trainer"].update({"checkpoint_dir": str(tmp_path / "ckpt"), "bottom_mlp": [4]})
    doc["hash"] = {"min_events_to_fit": 500, "refit_every_s": 10.0, **hash_cfg}
    return config_from_dict(doc)


def ingest(cache, cfg, start, n):
    sb = source_batch(generate_payloads(SPEC, n, start), start_offset=start)
    cache.write(process_batch(sb, TransformSpec.from_config(cfg), current_mappings(cfg)))


def test_scheduler_fits_once_per_period_and_skips_without_data(tmp_path):
    cfg = make_cfg(tmp_path)
    now = [100.0]
    with BatchCache(cfg.cache.path) as cache:
        IdStatsStore.attach(cache, cfg.schema, cfg.hash)
        sched = RefitScheduler(cfg, cache, clock=lambda: now[0])
        assert sched.maybe_refit() is None  # the period has not passed
        ingest(cache, cfg, 0, 100)
        now[0] += 10.0
        skipped = sched.maybe_refit()
        assert "min_events_to_fit" in skipped["skipped"] and mapping_store(cfg).versions() == []
        ingest(cache, cfg, 100, 1500)
        assert sched.maybe_refit() is None  # retried only at the next period
        now[0] += 10.0
        rep = sched.maybe_refit()
        assert rep["version"] == 1 and mapping_store(cfg).versions() == [1]
        for f in ("c1", "c2"):
            fr = rep["features"][f]
            assert fr["fitted"] and fr["mapper"] == "learned" and not fr["used_embeddings"]
            assert fr["events"] == 1600 and fr["distinct_ids"] <= 400
            assert fr["collision_mass"] < fr["before"]["collision_mass"]  # hot ids own rows now
        # batches processed from now on carry version 1; the stored set maps every id
        ingest(cache, cfg, 1600, 10)
        assert cache.read(cache.last_seq()).mapping_version == 1
        ms = mapping_store(cfg).load()
        rows = ms["c1"].map(np.arange(-5, 5, dtype=np.int64))
        assert rows.min() >= 0 and rows.max() < 64
        now[0] += 10.0
        assert sched.maybe_refit()["version"] == 2
    # Old versions are pruned after each fit ([hash] keep_mappings), never one a reader may
    # still meet: the oldest cached batch carries version 0, so versions 1 and 2 stay ...
    cfg = make_cfg(tmp_path, keep_mappings=2)
    with BatchCache(cfg.cache.path) as cache:
        assert fit_from_cache(cfg, cache=cache)["pruned_versions"] == []
        assert mapping_store(cfg).versions() == [1, 2, 3]
    # ... until retention has dropped every batch older than version 3
    with BatchCache(cfg.cache.path, max_bytes=1) as cache:
        ingest(cache, cfg, 1610, 10)
        assert cache.oldest_mapping_version() == 3
        assert fit_from_cache(cfg, cache=cache)["pruned_versions"] == [1, 2]
    assert mapping_store(cfg).versions() == [3, 4]


def test_frequency_fit_kind_and_errors(tmp_path):
    cfg = make_cfg(tmp_path, fit="frequency")
    with BatchCache(cfg.cache.path) as cache:
        IdStatsStore.attach(cache, cfg.schema, cfg.hash)
        with pytest.raises(MappingError, match="min_events_to_fit"):
            fit_from_cache(cfg, cache=cache)
        ingest(cache, cfg, 0, 800)
        rep = fit_from_cache(cfg, cache=cache)
    assert {r["mapper"] for r in rep["features"].values()} == {"frequency"}
    assert rep["stats"]["c1"]["events"] == 800
    with pytest.raises(MappingError, match="refit_every_s"):
        RefitScheduler(make_cfg(tmp_path, refit_every_s=0.0))
