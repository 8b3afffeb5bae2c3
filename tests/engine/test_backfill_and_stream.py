"""Backfill and streaming of the same log give identical cached rows; bad events become
dead letters with their reasons while the good events around them are cached."""

from __future__ import annotations

import signal

import pyarrow as pa
import pytest

from streams.synthetic import BAD_PAYLOADS, generate_payloads
from tests.engine_helpers import (
    SMALL_SPEC,
    cache_counts,
    cached_table,
    headrace,
    last_json,
    small_config_doc,
    start_headrace,
    stop,
    wait_until,
    write_config,
)

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

N = 3000


def _log_lines(with_bad: bool) -> list[bytes]:
    lines = generate_payloads(SMALL_SPEC, N, bad_fraction=0.01 if with_bad else 0.0)
    # an empty line is an event too (empty_message); keep everything one line each
    return [ln.replace(b"\n", b" ") for ln in lines]


def _feature_table(cache_path) -> pa.Table:
    batches = [b for _, _, b in cached_table(cache_path)]
    table = pa.Table.from_batches(batches)
    return table.drop_columns(["_offset"])


def test_backfill_equals_stream_and_dead_letters_reconcile(broker, new_topic, tmp_path):
    lines = _log_lines(with_bad=True)
    log_file = tmp_path / "events.jsonl"
    log_file.write_bytes(b"\n".join(lines) + b"\n")
    topic = new_topic(partitions=1)

    # --- backfill the file
    bf_cfg = write_config(tmp_path, small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic, cache="bf"), "bf.toml")
    res = headrace("backfill", "-c", str(bf_cfg), "--from", str(log_file), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    summary = last_json(res.stdout)
    assert summary["read"] == N
    assert summary["read"] == summary["cached_rows"] + summary["filtered"] + summary["dead_letters"]
    assert summary["dead_letters"] == len([ln for ln in lines if ln in BAD_PAYLOADS])

    # every kind of bad input is there with its reason
    stat = last_json(headrace("cache", "stat", "-c", str(bf_cfg), "--json").stdout)
    assert set(stat["dead_letters"]) >= {"empty_message", "malformed_json", "not_utf8", "not_an_object",
                                         "missing_label", "bad_label", "wrong_type", "non_finite"}
    assert sum(stat["dead_letters"].values()) == summary["dead_letters"]
    assert stat["rows"] == summary["cached_rows"]

    # a second backfill of the same file adds nothing (resumable, idempotent)
    again = last_json(headrace("backfill", "-c", str(bf_cfg), "--from", str(log_file), "--json").stdout)
    assert again["read"] == 0 and again["cached_rows"] == 0

    # --- stream the same file through Kafka
    st_cfg = write_config(tmp_path, small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic, cache="st"), "st.toml")
    res = headrace("produce", "-c", str(st_cfg), "--from", str(log_file), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    assert last_json(res.stdout)["produced"] == N
    log = tmp_path / "serve.log"
    proc = start_headrace("serve", "--no-train", "-c", str(st_cfg), log_path=log)
    wait_until(lambda: cache_counts(tmp_path / "st")["read"] >= N, 120, "stream fully read", proc, log)
    assert stop(proc, signal.SIGTERM) == 0, log.read_text()[-4000:]

    keys = ("read", "cached_rows", "filtered", "dead_letters")
    st_counts, bf_counts = cache_counts(tmp_path / "st"), cache_counts(tmp_path / "bf")
    assert [st_counts[k] for k in keys] == [bf_counts[k] for k in keys]
    streamed, backfilled = _feature_table(tmp_path / "st"), _feature_table(tmp_path / "bf")
    assert streamed.schema == backfilled.schema
    assert streamed.equals(backfilled)
