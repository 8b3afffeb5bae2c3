"""Smoke test of ``bench/scale.py``: two pipeline workers backfill everything, and the feed
comparison trains every row both ways; the JSON contract is the last line."""

from __future__ import annotations

import pytest

from tests.bench.test_hash_bench import run_json

pytestmark = pytest.mark.slow


def test_scale_bench_prints_its_contract():
    out = run_json("bench/scale.py", "--events", "4000", "--files", "2", "--only", "workers_2",
                   "--train-rows", "4000", "--train-repeats", "1", "--json")
    assert out["events"] == 4000 and out["workers_2_events_per_s"] > 0 and out["workers_2_wall_events_per_s"] > 0
    # compare() asserts that each run trained every row; the contract's keys are unprefixed
    assert out["local_train_samples_per_s"] > 0 and out["feed_train_samples_per_s"] > 0
    assert out["feed_ratio"] == pytest.approx(out["feed_train_samples_per_s"] / out["local_train_samples_per_s"])
