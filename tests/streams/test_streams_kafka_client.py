"""Both Kafka clients against the session broker: tiling, tombstones, resume, offsets."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import KafkaClientKind, SourceConfig, StartPosition
from streams.errors import SourceConfigError
from streams.kafka_client import offsets_for_times, open_reader
from streams.offsets import exact_offsets_for_times, log_end_offsets
from streams.producer import produce_values

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

CLIENTS = [KafkaClientKind.KAFKA_PYTHON, pytest.param(KafkaClientKind.CONFLUENT, id="confluent")]


def _cfg(broker, topic, client, **kw):
    return SourceConfig(bootstrap=broker.bootstrap, topics=(topic,), client=client, poll_timeout_ms=200, **kw)


def _read_all(reader, expected_records, max_records, deadline_polls=200):
    batches = []
    got = 0
    for _ in range(deadline_polls):
        if got >= expected_records:
            break
        batch = reader.poll(max_records, 200)
        if batch is not None:
            batches.append(batch)
            got += batch.records.num_rows
    assert got == expected_records, f"read {got} of {expected_records} records"
    return batches


@pytest.mark.parametrize("client", CLIENTS)
def test_reader_tiles_offsets_and_keeps_tombstones(broker, new_topic, client):
    topic = new_topic(1)
    values = [b"v%d" % i for i in range(250)] + [None, b"", b"last"]
    stamps = [1_000 + i for i in range(len(values))]
    assert produce_values(broker.bootstrap, topic, values, partition=0, timestamps_ms=stamps, client=client) == 253
    cfg = _cfg(broker, topic, client)
    with open_reader(cfg, topic, 0, StartPosition.EARLIEST) as reader:
        batches = _read_all(reader, 253, max_records=64)
        assert reader.poll(64, 100) is None  # nothing new: no batch, position unchanged
        assert reader.position() == 253
    assert batches[0].start_offset == 0 and batches[-1].end_offset == 253
    for prev, nxt in zip(batches, batches[1:]):
        assert prev.end_offset == nxt.start_offset
    assert all(b.records.num_rows <= 64 and b.partition_start == 0 for b in batches)
    got_values = [v for b in batches for v in b.records.column(2).to_pylist()]
    assert got_values == [v if v is not None else b"" for v in values]
    assert [t for b in batches for t in b.records.column(1).to_pylist()] == stamps
    assert [o for b in batches for o in b.records.column(0).to_pylist()] == list(range(253))


@pytest.mark.parametrize("client", CLIENTS)
def test_reader_resumes_from_an_offset_and_seeks(broker, new_topic, client):
    topic = new_topic(2)
    produce_values(broker.bootstrap, topic, [b"p1-%d" % i for i in range(40)], partition=1, client=client)
    cfg = _cfg(broker, topic, client)
    with open_reader(cfg, topic, 1, 25) as reader:
        batches = _read_all(reader, 15, max_records=100)
        assert batches[0].start_offset == 25 and batches[0].partition_start == 25
        assert batches[0].records.column(2)[0].as_py() == b"p1-25"
        reader.seek(3)
        again = _read_all(reader, 37, max_records=1000)
        assert again[0].start_offset == 3 and again[-1].end_offset == 40
    with open_reader(cfg, topic, 0, StartPosition.EARLIEST) as empty:
        assert empty.poll(10, 100) is None and empty.position() == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_end_offsets_and_times_are_exact_after_probing(broker, new_topic, client):
    topic = new_topic(1)
    # Several producer calls -> several record batches in the log.
    for chunk in range(4):
        produce_values(broker.bootstrap, topic, [b"x"] * 50, partition=0,
                       timestamps_ms=[10_000 + chunk * 50 + i for i in range(50)], client=client)
    cfg = _cfg(broker, topic, client)
    assert log_end_offsets(cfg, topic, [0]) == {0: 200}
    assert exact_offsets_for_times(cfg, topic, {0: 10_075}) == {0: 75}
    assert exact_offsets_for_times(cfg, topic, {0: 99_999}) == {0: None}
    hint = offsets_for_times(cfg, topic, {0: 10_075})[0]
    assert hint is not None and hint <= 75  # Tansu: the containing batch's base offset


@pytest.mark.parametrize("client", CLIENTS)
def test_latest_start_reads_only_new_records(broker, new_topic, client):
    topic = new_topic(1)
    produce_values(broker.bootstrap, topic, [b"old"] * 30, partition=0, client=client)
    cfg = dataclasses.replace(_cfg(broker, topic, client), start=StartPosition.LATEST)
    assert log_end_offsets(cfg, topic, [0]) == {0: 30}
    with open_reader(cfg, topic, 0, StartPosition.LATEST) as reader:
        assert reader.position() == 30 and reader.partition_start == 30
        assert reader.poll(10, 100) is None
        produce_values(broker.bootstrap, topic, [b"new"] * 3, partition=0, client=client)
        batches = _read_all(reader, 3, max_records=10)
    assert [v for b in batches for v in b.records.column(2).to_pylist()] == [b"new"] * 3


def test_bad_client_options_are_config_errors(broker, new_topic):
    topic = new_topic(1)
    bad_py = _cfg(broker, topic, KafkaClientKind.KAFKA_PYTHON, client_options={"not.an.option": "1"})
    with pytest.raises(SourceConfigError, match="not.an.option"):
        open_reader(bad_py, topic, 0, 0)
    pytest.importorskip("confluent_kafka")
    bad_ck = _cfg(broker, topic, KafkaClientKind.CONFLUENT, client_options={"not.an.option": "1"})
    with pytest.raises(SourceConfigError, match="librdkafka"):
        open_reader(bad_ck, topic, 0, 0)


@pytest.mark.parametrize("client", CLIENTS)
def test_message_larger_than_default_fetch_size_is_read(broker, new_topic, client):
    topic = new_topic(1)
    big = b"z" * (1_500_000)
    opts = {"message.max.bytes": "4000000"} if client is KafkaClientKind.CONFLUENT else {"max_request_size": "4000000"}
    produce_values(broker.bootstrap, topic, [b"small", big, b"after"], partition=0, client=client, client_options=opts)
    cfg = _cfg(broker, topic, client, max_message_bytes=2_000_000)
    with open_reader(cfg, topic, 0, 0) as reader:
        batches = _read_all(reader, 3, max_records=10)
    assert [len(v) for b in batches for v in b.records.column(2).to_pylist()] == [5, len(big), 5]


@pytest.mark.parametrize("client", CLIENTS)
def test_end_probe_stops_once_it_reaches_the_offset_asked_for(broker, new_topic, client, monkeypatch):
    import streams.offsets as offsets

    topic = new_topic(1)
    for _ in range(4):
        produce_values(broker.bootstrap, topic, [b"x"] * 50, partition=0, client=client)
    cfg = _cfg(broker, topic, client)
    empty_polls = []
    real_backend_for = offsets.backend_for

    class _Counting:
        def __init__(self, backend):
            self._backend = backend

        def __getattr__(self, name):
            return getattr(self._backend, name)

        def open_reader(self, *args, **kwargs):
            reader = self._backend.open_reader(*args, **kwargs)
            poll = reader.poll

            def counted(max_records, timeout_ms):
                batch = poll(max_records, timeout_ms)
                if batch is None:
                    empty_polls.append(timeout_ms)
                return batch

            reader.poll = counted
            return reader

    monkeypatch.setattr(offsets, "backend_for", lambda kind: _Counting(real_backend_for(kind)))
    # Confirming the end takes one poll that finds nothing and waits out its timeout...
    assert log_end_offsets(cfg, topic, [0]) == {0: 200}
    assert len(empty_polls) == 1
    # ... which a bounded read that only needs to know the end is at or past 200 skips.
    empty_polls.clear()
    assert log_end_offsets(cfg, topic, [0], enough={0: 200}) == {0: 200}
    assert empty_polls == []
    # Asking for more than the log holds still finds the real end.
    assert log_end_offsets(cfg, topic, [0], enough={0: 500}) == {0: 200}
    assert len(empty_polls) == 1


def test_confluent_reader_keeps_fetching_while_the_pipeline_works_unless_told_otherwise():
    pytest.importorskip("confluent_kafka")
    from streams.backend_confluent import _consumer_config

    cfg = SourceConfig(bootstrap="127.0.0.1:9", topics=("t",), client=KafkaClientKind.CONFLUENT)
    # librdkafka's default (1000 ms) pauses fetching whenever its queue is "full enough",
    # which left a busy reader waiting for a fetch at every poll.
    assert _consumer_config(cfg)["fetch.queue.backoff.ms"] == 10
    user = dataclasses.replace(cfg, client_options={"fetch.queue.backoff.ms": "500"})
    assert _consumer_config(user)["fetch.queue.backoff.ms"] == "500"
