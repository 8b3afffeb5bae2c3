"""Bounded replay through Beam: log files (gz, blank lines, resume) and Kafka ranges."""

from __future__ import annotations

import gzip

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from engine.config import KafkaClientKind, SourceConfig
from streams.errors import SourceConfigError, SourceError
from streams.producer import produce_file, produce_values
from streams.replay import ReadKafkaRange, ReadLogFiles, file_topic, plan_kafka_range

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def _pipeline():
    return beam.Pipeline(runner="DirectRunner", options=PipelineOptions(flags=[]))


def _rows(batch):
    return [(batch.topic, batch.partition, o, v) for o, v in
            zip(batch.records.column(0).to_pylist(), batch.records.column(2).to_pylist())]


def _ranges(batch):
    return (batch.topic, batch.partition, batch.start_offset, batch.end_offset, batch.partition_start)


def _tiled(expected_bounds):
    """Matcher over _ranges tuples: per partition, contiguous from start to end."""

    def check(ranges):
        by_part: dict = {}
        for t, p, s, e, ps in ranges:
            by_part.setdefault((t, p), []).append((s, e, ps))
        assert set(by_part) == set(expected_bounds)
        for key, parts in by_part.items():
            parts.sort()
            start, end = expected_bounds[key]
            assert parts[0][0] == start and parts[-1][1] == end, (key, parts)
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])), (key, parts)
            assert {ps for _, _, ps in parts} == {start}

    return check


def _write_logs(tmp_path):
    plain_lines = [b'{"label": 1, "i": %d}' % i if i % 5 else b"" for i in range(37)]
    gz_lines = [b"1\t%d\tx" % i for i in range(12)]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"\n".join(plain_lines) + b"\n")
    gz = tmp_path / "b.tsv.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b"\r\n".join(gz_lines))  # CRLF, no final newline
    return (str(plain), plain_lines), (str(gz), gz_lines)


def test_read_log_files_every_line_once_with_offsets(tmp_path):
    (plain, plain_lines), (gz, gz_lines) = _write_logs(tmp_path)
    expected = ([(file_topic(plain), 0, i, v) for i, v in enumerate(plain_lines)]
                + [(file_topic(gz), 0, i, v) for i, v in enumerate(gz_lines)])
    with _pipeline() as p:
        batches = p | ReadLogFiles([plain, gz], max_batch_records=8)
        assert_that(batches | "Rows" >> beam.FlatMap(_rows), equal_to(expected), label="rows")
        assert_that(batches | "Ranges" >> beam.Map(_ranges),
                    _tiled({(file_topic(plain), 0): (0, 37), (file_topic(gz), 0): (0, 12)}), label="ranges")


def test_read_log_files_resumes_from_start_offsets(tmp_path):
    (plain, plain_lines), (gz, gz_lines) = _write_logs(tmp_path)
    starts = {(file_topic(plain), 0): 30, (file_topic(gz), 0): 12}  # gz fully consumed
    expected = [(file_topic(plain), 0, i, plain_lines[i]) for i in range(30, 37)]
    with _pipeline() as p:
        batches = p | ReadLogFiles([plain, gz], max_batch_records=4, start_offsets=starts)
        assert_that(batches | "Rows" >> beam.FlatMap(_rows), equal_to(expected), label="rows")
        assert_that(batches | "Ranges" >> beam.Map(_ranges), _tiled({(file_topic(plain), 0): (30, 37)}),
                    label="ranges")


def test_read_log_files_rejects_bad_paths(tmp_path):
    (plain, _), _ = _write_logs(tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        ReadLogFiles([str(tmp_path / "missing.jsonl")])
    with pytest.raises(SourceError, match="unknown extension"):
        ReadLogFiles([str(tmp_path / "x.parquet")])
    with pytest.raises(SourceConfigError, match="listed twice"):
        ReadLogFiles([plain, plain])


CLIENTS = [KafkaClientKind.KAFKA_PYTHON, pytest.param(KafkaClientKind.CONFLUENT, id="confluent")]


@pytest.mark.parametrize("client", CLIENTS)
def test_kafka_offset_range_and_resume(broker, new_topic, client):
    topic = new_topic(2)
    values = {q: [b"%d-%d" % (q, i) for i in range(60)] for q in range(2)}
    for q, vals in values.items():
        produce_values(broker.bootstrap, topic, vals, partition=q, client=client)
    cfg = SourceConfig(bootstrap=broker.bootstrap, topics=("ignored",), client=client, max_batch_records=16,
                       poll_timeout_ms=100)
    # Partition 0 [10, 45), resumed by the cache at 20; partition 1 from the start to the log end.
    expected = ([(topic, 0, i, values[0][i]) for i in range(20, 45)]
                + [(topic, 1, i, values[1][i]) for i in range(60)])
    with _pipeline() as p:
        batches = p | ReadKafkaRange(cfg, topic, from_offsets={0: 10, 1: 0}, to_offsets={0: 45},
                                     start_offsets={(topic, 0): 20})
        assert_that(batches | "Rows" >> beam.FlatMap(_rows), equal_to(expected), label="rows")
        assert_that(batches | "Ranges" >> beam.Map(_ranges), _tiled({(topic, 0): (20, 45), (topic, 1): (0, 60)}),
                    label="ranges")


@pytest.mark.parametrize("client", CLIENTS)
def test_kafka_time_range_is_exact_and_counts_out_of_order_records(broker, new_topic, client):
    topic = new_topic(1)
    # Four producer calls = several record batches, so Tansu's approximate time lookup
    # lands on batch boundaries below the true offsets; the probe must correct it.
    stamps = [1_000 + 10 * i for i in range(80)]
    stamps[50] = 5  # out of order: inside the offset range, outside the time window
    for lo in range(0, 80, 20):
        produce_values(broker.bootstrap, topic, [b"e%d" % i for i in range(lo, lo + 20)], partition=0,
                       timestamps_ms=stamps[lo:lo + 20], client=client)
    cfg = SourceConfig(bootstrap=broker.bootstrap, topics=(topic,), client=client, max_batch_records=16,
                       poll_timeout_ms=100)
    from_ms, to_ms = 1_000 + 10 * 25, 1_000 + 10 * 65  # offsets [25, 65)
    assert plan_kafka_range(cfg, topic, from_time_ms=from_ms, to_time_ms=to_ms) == {0: (25, 65)}
    expected = [(topic, 0, i, b"e%d" % i) for i in range(25, 65) if i != 50]
    with _pipeline() as p:
        batches = p | ReadKafkaRange(cfg, topic, from_time_ms=from_ms, to_time_ms=to_ms)
        assert_that(batches | "Rows" >> beam.FlatMap(_rows), equal_to(expected), label="rows")
        assert_that(batches | "Ranges" >> beam.Map(_ranges), _tiled({(topic, 0): (25, 65)}), label="ranges")
    result = p.result
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_name("outside_time_range"))["counters"]
    assert sum(c.committed for c in counters) == 1
    # Open-ended: from a time to the end of the log.
    assert plan_kafka_range(cfg, topic, from_time_ms=1_000 + 10 * 70) == {0: (70, 80)}
    # No record at or after the start time: an empty range.
    assert plan_kafka_range(cfg, topic, from_time_ms=10**9) == {0: (80, 80)}


def test_kafka_range_one_bound_for_all_partitions_is_clamped_to_the_log_end(broker, new_topic):
    topic = new_topic(2)
    produce_values(broker.bootstrap, topic, [b"a"] * 30, partition=0)
    produce_values(broker.bootstrap, topic, [b"b"] * 10, partition=1)
    cfg = SourceConfig(bootstrap=broker.bootstrap, topics=(topic,), client=KafkaClientKind.KAFKA_PYTHON)
    assert plan_kafka_range(cfg, topic, from_offsets=5, to_offsets=20) == {0: (5, 20), 1: (5, 10)}
    assert plan_kafka_range(cfg, topic, from_offsets=12) == {0: (12, 30), 1: (10, 10)}
    assert plan_kafka_range(cfg, topic, to_offsets={1: 99}) == {1: (0, 10)}
    with pytest.raises(SourceConfigError, match="invalid"):
        plan_kafka_range(cfg, topic, from_offsets=9, to_offsets=3)


def test_kafka_range_argument_errors(broker, new_topic):
    topic = new_topic(1)
    cfg = SourceConfig(bootstrap=broker.bootstrap, topics=(topic,), client=KafkaClientKind.KAFKA_PYTHON)
    with pytest.raises(SourceConfigError, match="not both"):
        plan_kafka_range(cfg, topic, from_offsets={0: 0}, to_time_ms=5)
    with pytest.raises(SourceConfigError, match="no partition"):
        plan_kafka_range(cfg, topic, from_offsets={3: 0})
    with pytest.raises(SourceConfigError, match="before from_time_ms"):
        plan_kafka_range(cfg, topic, from_time_ms=10, to_time_ms=5)
    with pytest.raises(SourceConfigError, match="needs"):
        ReadKafkaRange(cfg, topic)


def test_produce_file_round_robin_and_keyed(broker, new_topic, tmp_path):
    path = tmp_path / "events.jsonl.gz"
    lines = [b'{"user": "u%d", "i": %d}' % (i % 3, i) for i in range(30)] + [b""]
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    rr_topic = new_topic(3)
    assert produce_file(broker.bootstrap, rr_topic, str(path)) == 31
    keyed_topic = new_topic(3)
    assert produce_file(broker.bootstrap, keyed_topic, str(path), key_field="user", rate_events_per_s=10_000) == 31
    cfg = SourceConfig(bootstrap=broker.bootstrap, topics=("x",), client=KafkaClientKind.KAFKA_PYTHON)
    from streams.offsets import log_end_offsets

    assert log_end_offsets(cfg, rr_topic, [0, 1, 2]) == {0: 11, 1: 10, 2: 10}
    from streams.producer import key_partition

    expected = {0: 1, 1: 0, 2: 0}  # the blank line (index 30) has no key: round-robin -> 0
    for user in range(3):
        expected[key_partition(b"u%d" % user, 3)] += 10
    assert log_end_offsets(cfg, keyed_topic, [0, 1, 2]) == expected
