"""A CSV log with a header, quoted fields and gzip, configured with a derived label, a
derived sparse feature, a derived event time and a feature cross: backfilled from the file
and streamed through Kafka it gives the same cached rows, hostile records become reasoned
dead letters, and the trainer trains on the derived and crossed columns."""

from __future__ import annotations

import gzip
import random
import signal

import pyarrow as pa
import pytest

from engine.config import load_config
from tests.engine_helpers import (
    cache_counts,
    cached_table,
    headrace,
    last_json,
    start_headrace,
    stop,
    wait_until,
    write_config,
)
from trainer.embedding import table_specs
from trainer.loop import ContinuousTrainer
from transforms.elements import id_column
from transforms.hashing import hash_bytes_value, hash_cross_value, hash_int_value

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

COLUMNS = ["rating", "site", "device", "hour", "ts", "price", "note"]
N = 1500
HOSTILE = [
    b"4,s1,1,2024010101,1700000000",  # too few fields
    b"4,s1,1,2024010101,1700000000,1.5,x,extra",  # too many
    b"4,s\xff1,1,2024010101,1700000000,1.5,x",  # not UTF-8
    b'4,s"1,1,2024010101,1700000000,1.5,x',  # quote inside an unquoted field
    b"",  # blank line
    b"five,s1,1,2024010101,1700000000,1.5,x",  # rating not a number
    b",s1,1,2024010101,1700000000,1.5,x",  # no rating: no label
    b'4,"site,with comma,1,2024010101,1700000000,1.5,unbalanced',  # a quote never closed: last, or the
]  # record would run on (RFC 4180) to the next line that closes it, as far as MAX_CSV_RECORD_LINES
DEAD_REASONS = {"bad_csv_row", "not_utf8", "empty_message", "wrong_type", "missing_label"}


def _csv(v) -> bytes:
    s = str(v).encode()
    return b'"' + s.replace(b'"', b'""') + b'"' if any(c in s for c in b',"\n') else s


def _log(seed: int = 3) -> tuple[bytes, list[dict]]:
    rng = random.Random(seed)
    notes = ["plain", 'said "hi"', "a, b", "two\nlines", ""]
    events, lines = [], []
    for i in range(N):
        e = {"rating": rng.randint(1, 5), "site": rng.choice(["s1", "s,2", 's"3', "s4"]), "device": rng.randint(0, 9),
             "hour": 24010100 + rng.randint(0, 23), "ts": 1_700_000_000 + i, "price": rng.randint(0, 99) / 4,
             "note": rng.choice(notes)}
        events.append(e)
        lines.append(b",".join(_csv(e[c]) for c in COLUMNS))
    for k, bad in enumerate(HOSTILE[:-1]):
        lines.insert(150 * (len(HOSTILE) - k), bad)
    lines.append(HOSTILE[-1])
    return b"\r\n".join([",".join(COLUMNS).encode()] + lines) + b"\r\n", events


def _doc(tmp_path, bootstrap: str, topic: str, cache: str) -> dict:
    return {
        "source": {"bootstrap": bootstrap, "topics": [topic], "max_batch_records": 256, "poll_timeout_ms": 100},
        "schema": {
            "format": "csv", "columns": COLUMNS,  # files name their columns in the header; Kafka messages here
            "label": "liked", "event_time": "ts_ms",
            "derive": {"liked": "rating >= 4", "hour_of_day": "hour % 100", "ts_ms": "ts * 1000"},
            "dense": [{"name": "price"}],
            "sparse": [{"name": "site", "rows": 100}, {"name": "device", "type": "int", "rows": 16},
                       {"name": "hour_of_day", "type": "int", "rows": 24}],
            "cross": [["site", "device"]], "cross_rows": 512,
        },
        "filter": {"where": ["hour_of_day != 3"]},
        "cache": {"path": str(tmp_path / cache)},
        "trainer": {"embedding_dim": 8, "bottom_mlp": [16, 8], "top_mlp": [16], "batch_size": 128,
                    "checkpoint_dir": str(tmp_path / (cache + "-ckpt")), "checkpoint_every_batches": 20},
    }


def _features(cache_path) -> pa.Table:
    return pa.Table.from_batches([b for _, _, b in cached_table(cache_path)]).drop_columns(["_offset"])


def test_csv_log_backfill_equals_stream_with_derived_fields_and_crosses(broker, new_topic, tmp_path):
    data, events = _log()
    log_file = tmp_path / "ratings.csv.gz"
    log_file.write_bytes(gzip.compress(data))
    records = N + len(HOSTILE)
    kept = [e for e in events if e["hour"] % 100 != 3]
    topic = new_topic(partitions=1)

    bf_cfg = write_config(tmp_path, _doc(tmp_path, broker.bootstrap, topic, "bf"), "bf.toml")
    res = headrace("backfill", "-c", str(bf_cfg), "--from", str(log_file), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    summary = last_json(res.stdout)
    assert summary["read"] == records  # the header row is not an event
    assert summary["read"] == summary["cached_rows"] + summary["filtered"] + summary["dead_letters"]
    assert (summary["cached_rows"], summary["filtered"], summary["dead_letters"]) == (
        len(kept), N - len(kept), len(HOSTILE))
    stat = last_json(headrace("cache", "stat", "-c", str(bf_cfg), "--json").stdout)
    assert set(stat["dead_letters"]) == DEAD_REASONS and stat["dead_letters"]["bad_csv_row"] == 4

    table = _features(tmp_path / "bf")
    assert table.column("liked").to_pylist() == [float(e["rating"] >= 4) for e in kept]
    assert table.column(id_column("hour_of_day")).to_pylist() == [hash_int_value(e["hour"] % 100) for e in kept]
    assert table.column("_event_time_ms").to_pylist() == [e["ts"] * 1000 for e in kept]
    assert table.column(id_column("site")).to_pylist() == [hash_bytes_value(e["site"]) for e in kept]
    assert table.column(id_column("site_x_device")).to_pylist() == [
        hash_cross_value([hash_bytes_value(e["site"]), hash_int_value(e["device"])]) for e in kept]
    assert "rating" not in table.column_names and "note" not in table.column_names

    again = last_json(headrace("backfill", "-c", str(bf_cfg), "--from", str(log_file), "--json").stdout)
    assert again["read"] == 0 and again["cached_rows"] == 0

    # --- the same records through Kafka, one message per record (the header is not sent)
    st_cfg = write_config(tmp_path, _doc(tmp_path, broker.bootstrap, topic, "st"), "st.toml")
    res = headrace("produce", "-c", str(st_cfg), "--from", str(log_file), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    assert last_json(res.stdout)["produced"] == records
    log = tmp_path / "serve.log"
    proc = start_headrace("serve", "--no-train", "-c", str(st_cfg), log_path=log)
    wait_until(lambda: cache_counts(tmp_path / "st")["read"] >= records, 120, "stream fully read", proc, log)
    assert stop(proc, signal.SIGTERM) == 0, log.read_text()[-4000:]
    keys = ("read", "cached_rows", "filtered", "dead_letters")
    assert [cache_counts(tmp_path / "st")[k] for k in keys] == [cache_counts(tmp_path / "bf")[k] for k in keys]
    assert _features(tmp_path / "st").equals(table)

    # --- and the trainer trains on the derived label and the crossed feature (one table each)
    cfg = load_config(bf_cfg)
    assert [t.name for t in table_specs(cfg.schema, 8)] == ["site", "device", "hour_of_day", "site_x_device"]
    assert ContinuousTrainer(cfg.train_spec()).run()["trained_samples"] == len(kept)
