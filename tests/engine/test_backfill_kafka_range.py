"""headrace backfill --from kafka:TOPIC over an offset range and over a time range."""

from __future__ import annotations

import datetime as dt

import pytest

from streams.producer import produce_values
from streams.synthetic import generate_payloads
from tests.engine_helpers import SMALL_SPEC, headrace, last_json, small_config_doc, write_config

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

T0 = 1_767_225_600_000  # record timestamps: T0 + i seconds


def test_offset_and_time_ranges(broker, new_topic, tmp_path):
    topic = new_topic(partitions=1)
    payloads = generate_payloads(SMALL_SPEC, 600)
    for start in range(0, 600, 100):  # several produce batches (Tansu reports end offsets right then)
        produce_values(broker.bootstrap, topic, payloads[start:start + 100], partition=0,
                       timestamps_ms=[T0 + 1000 * i for i in range(start, start + 100)])

    by_offset = write_config(tmp_path, small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic, cache="o"), "o.toml")
    res = headrace("backfill", "-c", str(by_offset), "--from", f"kafka:{topic}", "--start-offset", "100",
                   "--end-offset", "350", "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    assert last_json(res.stdout)["read"] == 250

    by_time = write_config(tmp_path, small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic, cache="t"), "t.toml")
    start = dt.datetime.fromtimestamp((T0 + 1000 * 200) / 1000, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    res = headrace("backfill", "-c", str(by_time), "--from", f"kafka:{topic}", "--start-time", start,
                   "--end-time", str(T0 + 1000 * 260), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    assert last_json(res.stdout)["read"] == 60  # records whose own timestamps are in [200 s, 260 s)

    res = headrace("backfill", "-c", str(by_time), "--from", f"kafka:{topic}", "--start-offset", "1")
    assert res.returncode == 2 and "--end-offset" in res.stderr
