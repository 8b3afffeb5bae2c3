"""A reader survives a broker outage: polls return nothing, then reading continues at
the same position once a broker is back on the address."""

from __future__ import annotations

import time

import pytest

from engine.config import KafkaClientKind, SourceConfig
from streams.admin import create_topic
from streams.broker import EmbeddedBroker
from streams.kafka_client import open_reader
from streams.producer import produce_values

CLIENTS = [KafkaClientKind.KAFKA_PYTHON, pytest.param(KafkaClientKind.CONFLUENT, id="confluent")]


def _read(reader, n, deadline_s=30.0):
    batches, got = [], 0
    deadline = time.monotonic() + deadline_s
    while got < n and time.monotonic() < deadline:
        batch = reader.poll(100, 100)
        if batch is not None:
            batches.append(batch)
            got += batch.records.num_rows
    assert got == n, f"read {got} of {n}"
    return batches


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_reader_rides_out_a_broker_outage(tmp_path, client):
    first = EmbeddedBroker(log_path=str(tmp_path / "first.log")).start()
    second = None
    try:
        create_topic(first.bootstrap, "t", 1, timeout_s=10)
        produce_values(first.bootstrap, "t", [b"a%d" % i for i in range(10)], partition=0, client=client)
        cfg = SourceConfig(bootstrap=first.bootstrap, topics=("t",), client=client, poll_timeout_ms=100)
        with open_reader(cfg, "t", 0, 0) as reader:
            _read(reader, 10)
            first.stop()
            for _ in range(3):  # outage: nothing read, no exception, position kept
                assert reader.poll(100, 100) is None
            assert reader.position() == 10
            # The embedded broker keeps data in memory only, so the one that comes back
            # is empty; write 14 records so offsets 10..13 exist again.
            second = EmbeddedBroker(first.port, log_path=str(tmp_path / "second.log")).start()
            create_topic(second.bootstrap, "t", 1, timeout_s=10)
            produce_values(second.bootstrap, "t", [b"b%d" % i for i in range(14)], partition=0, client=client)
            batches = _read(reader, 4)
        assert batches[0].start_offset == 10 and batches[-1].end_offset == 14
        assert [v for b in batches for v in b.records.column(2).to_pylist()] == [b"b10", b"b11", b"b12", b"b13"]
    finally:
        first.stop()
        if second is not None:
            second.stop()
