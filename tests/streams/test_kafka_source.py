"""ReadKafkaBatches in real Beam pipelines on the DirectRunner: bounded and streaming."""

from __future__ import annotations

import threading
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that

from engine.config import KafkaClientKind, SourceConfig, StartPosition
from engine.errors import SourceError
from streams.kafka_source import ReadKafkaBatches, plan_partitions
from streams.producer import produce_values

CLIENTS = [KafkaClientKind.KAFKA_PYTHON, pytest.param(KafkaClientKind.CONFLUENT, id="confluent")]


def _summary(batch):
    return (batch.topic, batch.partition, batch.start_offset, batch.end_offset, batch.partition_start,
            tuple(batch.records.column(0).to_pylist()), tuple(batch.records.column(2).to_pylist()))


def _tiles(expected: dict):
    """Matcher: per (topic, partition), batches tile [start, end) and hold exactly the
    expected values in offset order; ``expected[(t, p)] = (start, end, values)``."""

    def check(summaries):
        by_part: dict = {}
        for s in summaries:
            by_part.setdefault((s[0], s[1]), []).append(s)
        assert set(by_part) == set(expected), f"partitions read {sorted(by_part)} != {sorted(expected)}"
        for key, parts in by_part.items():
            start, end, values = expected[key]
            parts.sort(key=lambda s: s[2])
            assert parts[0][2] == start and parts[-1][3] == end, (key, [(s[2], s[3]) for s in parts])
            for prev, nxt in zip(parts, parts[1:]):
                assert prev[3] == nxt[2], f"{key}: gap or overlap between {prev[2:4]} and {nxt[2:4]}"
            assert all(s[4] == start for s in parts)
            offsets = [o for s in parts for o in s[5]]
            assert offsets == list(range(start, start + len(values))), key
            assert [v for s in parts for v in s[6]] == values, key

    return check


def _produce(broker, topic, partitions, per_partition, client, tag=b"v"):
    values = {p: [b"%s-%d-%d" % (tag, p, i) for i in range(per_partition)] for p in range(partitions)}
    for p, vals in values.items():
        produce_values(broker.bootstrap, topic, vals, partition=p, client=client)
    return values


@pytest.mark.parametrize("client", CLIENTS)
def test_bounded_read_of_two_topics_with_end_offsets_in_batch_mode(broker, new_topic, client):
    topic, other = new_topic(2), new_topic(1)
    values = _produce(broker, topic, 2, 300, client)
    other_values = _produce(broker, other, 1, 20, client, tag=b"o")
    cfg = SourceConfig(bootstrap=broker.bootstrap, topics=(topic, other), client=client, max_batch_records=70,
                       poll_timeout_ms=100)
    ends = {(topic, 0): 250, (topic, 1): 300, (other, 0): 20}
    expected = {(topic, 0): (0, 250, values[0][:250]), (topic, 1): (40, 300, values[1][40:]),
                (other, 0): (0, 20, other_values[0])}
    with beam.Pipeline(runner="DirectRunner", options=PipelineOptions(flags=[])) as p:
        out = p | ReadKafkaBatches(cfg, {(topic, 1): 40}, end_offsets=ends) | beam.Map(_summary)
        assert_that(out, _tiles(expected))


def test_plan_partitions_errors_and_start_resolution(broker, new_topic):
    topic = new_topic(3)
    _produce(broker, topic, 1, 10, KafkaClientKind.KAFKA_PYTHON)
    cfg = SourceConfig(bootstrap=broker.bootstrap, topics=(topic,), client=KafkaClientKind.KAFKA_PYTHON,
                       start=StartPosition.LATEST)
    specs = plan_partitions(cfg, {(topic, 2): 0})
    assert [(s[1], s[2]) for s in specs] == [(0, 10), (1, 0), (2, 0)]
    with pytest.raises(SourceError, match="past the end offset"):
        plan_partitions(cfg, {(topic, 0): 9}, {(topic, 0): 5})
    with pytest.raises(SourceError, match="do not exist"):
        plan_partitions(cfg, {}, {(topic, 7): 5})
    missing = SourceConfig(bootstrap=broker.bootstrap, topics=("no-such-topic-xyz",))
    with pytest.raises(SourceError, match="does not exist"):
        plan_partitions(missing, {})


class _Progress(beam.DoFn):
    """Test probe: appends each batch's record count to a file the test thread watches."""

    def __init__(self, path):
        self._path = path

    def process(self, batch):
        with open(self._path, "a") as f:
            f.write(f"{batch.records.num_rows}\n")
        yield batch


def _records_seen(path) -> int:
    try:
        with open(path) as f:
            return sum(int(line) for line in f if line.strip())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_streaming_read_follows_new_data_and_stops_on_stop_file(broker, new_topic, client, tmp_path):
    topic = new_topic(2)
    first = _produce(broker, topic, 2, 120, client, tag=b"a")
    progress = str(tmp_path / "progress")
    stop_file = str(tmp_path / "stop")
    failures: list[str] = []
    later = {q: [b"b-%d-%d" % (q, i) for i in range(55)] for q in range(2)}

    def driver():
        deadline = time.monotonic() + 60
        try:
            while _records_seen(progress) < 240:
                if time.monotonic() > deadline:
                    failures.append(f"first wave not read: {_records_seen(progress)} of 240")
                    return
                time.sleep(0.05)
            # The pipeline is now idling at the end of both partitions: new data must arrive.
            for q, vals in later.items():
                produce_values(broker.bootstrap, topic, vals, partition=q, client=client)
            while _records_seen(progress) < 350:
                if time.monotonic() > deadline:
                    failures.append(f"second wave not read: {_records_seen(progress)} of 350")
                    return
                time.sleep(0.05)
        finally:
            open(stop_file, "w").close()

    cfg = SourceConfig(bootstrap=broker.bootstrap, topics=(topic,), client=client, max_batch_records=50,
                       poll_timeout_ms=100)
    thread = threading.Thread(target=driver, daemon=True)
    thread.start()
    with beam.Pipeline(runner="DirectRunner", options=PipelineOptions(flags=[], streaming=True)) as p:
        out = (p | ReadKafkaBatches(cfg, {}, stop_file=stop_file) | beam.ParDo(_Progress(progress))
               | beam.Map(_summary))
        assert_that(out, _tiles({(topic, q): (0, 175, first[q] + later[q]) for q in range(2)}))
    thread.join(timeout=10)
    assert not failures, failures
