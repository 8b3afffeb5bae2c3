"""The CLI as a user drives it: the demo end to end, errors with exit codes, --json output."""

from __future__ import annotations

import pytest

from storage.batch_cache import BatchCache
from tests.engine_helpers import headrace, last_json, small_config_doc, write_config


@pytest.mark.slow
def test_demo_learns_and_reconciles(tmp_path):
    res = headrace("demo", "--events", "40000", "--max-seconds", "240", "--workdir", str(tmp_path), "--json", timeout_s=400)
    assert res.returncode == 0, res.stderr[-6000:]
    s = last_json(res.stdout)
    for key in ("events", "cached_rows", "dead_letters", "trained_samples", "auc", "logloss", "events_per_s"):
        assert key in s
    assert s["events"] == 40000
    assert s["events"] == s["cached_rows"] + s["dead_letters"] + s["filtered"]
    assert s["dead_letters"] > 0  # the demo stream carries a few malformed events on purpose
    assert s["trained_samples"] > 0.9 * s["cached_rows"]
    assert s["auc"] > 0.65, s


def test_unknown_config_key_is_a_clear_error(tmp_path):
    doc = small_config_doc(tmp_path)
    doc["cache"]["max_byte"] = 5
    res = headrace("cache", "stat", "-c", str(write_config(tmp_path, doc)), "--json")
    assert res.returncode == 2
    assert "max_byte" in res.stderr and "config.toml" in res.stderr


def test_missing_config_file(tmp_path):
    res = headrace("train", "-c", str(tmp_path / "nope.toml"))
    assert res.returncode == 2 and "not found" in res.stderr


def test_cache_stat_on_missing_and_empty_cache(tmp_path):
    cfg = write_config(tmp_path, small_config_doc(tmp_path))
    res = headrace("cache", "stat", "-c", str(cfg), "--json")
    assert res.returncode == 4 and "no cache" in res.stderr
    BatchCache(str(tmp_path / "cache")).close()
    res = headrace("cache", "stat", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    stat = last_json(res.stdout)
    assert stat["batches"] == 0 and stat["rows"] == 0 and stat["offsets"] == {} and stat["dead_letters"] == {}


def test_bad_plugin_name_fails_before_reading(tmp_path):
    doc = small_config_doc(tmp_path, pipeline={"plugins": ["no_such_module:Thing"]})
    log = tmp_path / "x.jsonl"
    log.write_text('{"label": 1}\n')
    res = headrace("backfill", "-c", str(write_config(tmp_path, doc)), "--from", str(log), "--json")
    assert res.returncode == 2
    assert "no_such_module" in res.stderr
