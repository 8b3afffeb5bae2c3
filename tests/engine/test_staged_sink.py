"""Staged batches (a distributed runner's workers) reach the cache in offset order, once."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

from engine.cache_sink import OrderedCacheWriter
from engine.errors import CacheError, ConfigError
from engine.staged_sink import StagedImporter, run_with_import, stage_batch, staging_area
from storage.batch_cache import BatchCache
from tests.storage.builders import make_pb


def _offsets(cache: BatchCache, topic: str) -> list[int]:
    return [o for b in cache.iter_batches() if b.topic == topic for o in b.batch.column("_offset").to_pylist()]


def _staged_files(staging: str) -> list[str]:
    return [f for _, _, files in os.walk(staging) for f in files if f.endswith(".pb")]


def test_staged_batches_are_imported_in_offset_order_as_their_predecessors_arrive(tmp_path):
    with BatchCache(tmp_path / "c") as cache, staging_area(str(tmp_path / "c")) as staging:
        writer = OrderedCacheWriter(cache)
        importer = StagedImporter(staging, cache, writer.write)
        a = [make_pb("a", 0, s, s + 10, partition_start=0) for s in range(0, 50, 10)]
        b = [make_pb("b", 3, s, s + 5, partition_start=100) for s in range(100, 120, 5)]
        for pb in (a[3], a[1], b[1], a[4]):  # no first batch of either partition yet
            stage_batch(staging, pb)
        assert importer.import_ready() == 0 and cache.next_offsets() == {}
        stage_batch(staging, a[0])
        assert importer.import_ready() == 2  # a[0], a[1]; a[3] still waits for a[2]
        assert cache.next_offset("a", 0) == 20
        for pb in (a[2], b[0], b[3], b[2]):
            stage_batch(staging, pb)
        assert importer.import_ready() == 7
        assert _offsets(cache, "a") == list(range(50)) and _offsets(cache, "b") == list(range(100, 120))
        assert writer.held_batches == 0 and _staged_files(staging) == []
        # a retried task stages a range again: deleted unread, the cache unchanged
        stage_batch(staging, a[2])
        assert importer.import_ready() == 0 and _staged_files(staging) == []
        assert writer.written == 9 and _offsets(cache, "a") == list(range(50))
        importer.check_drained()
    assert not os.path.exists(staging)  # the area is removed afterwards


def test_a_batch_whose_predecessor_never_comes_fails_the_run_and_stores_nothing_after_the_hole(tmp_path):
    with BatchCache(tmp_path / "c") as cache, staging_area(str(tmp_path / "c")) as staging:
        importer = StagedImporter(staging, cache, OrderedCacheWriter(cache).write)

        def pipeline():
            for s in (0, 10, 30):  # 20..30 is never produced
                stage_batch(staging, make_pb("t", 0, s, s + 10, partition_start=0))
                time.sleep(0.02)

        with pytest.raises(CacheError, match=r"t\[0\]: 1 staged batch\(es\) from offset 30 wait for offset 20"):
            run_with_import(pipeline, importer, poll_s=0.01)
        assert cache.next_offset("t", 0) == 20
        np.testing.assert_array_equal(_offsets(cache, "t"), np.arange(20))


def test_a_pipeline_error_is_raised_after_importing_what_it_staged(tmp_path):
    with BatchCache(tmp_path / "c") as cache, staging_area(str(tmp_path / "c")) as staging:
        importer = StagedImporter(staging, cache, OrderedCacheWriter(cache).write)
        started = threading.Event()

        def pipeline():
            stage_batch(staging, make_pb("t", 0, 0, 10, partition_start=0))
            started.set()
            raise RuntimeError("worker lost")

        with pytest.raises(RuntimeError, match="worker lost"):
            run_with_import(pipeline, importer, poll_s=0.01)
        assert started.is_set() and cache.next_offset("t", 0) == 10


def test_dask_runner_without_dask_installed_is_a_config_error(tmp_path, monkeypatch):
    from engine.pipeline import make_pipeline
    from tests.engine_helpers import small_config

    for mod in ("dask.distributed", "apache_beam.runners.dask.dask_runner"):
        monkeypatch.setitem(sys.modules, mod, None)  # what an import sees when it is not installed
    cfg = small_config(tmp_path, pipeline={"runner": "DaskRunner"})
    with pytest.raises(ConfigError, match=r"DaskRunner.*pip install 'headrace\[dask\]'"):
        make_pipeline(cfg, streaming=False)
    with pytest.raises(ConfigError, match="bounded pipelines only"):  # serve: unbounded
        make_pipeline(cfg, streaming=True)
