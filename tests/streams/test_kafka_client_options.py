"""Pure parts of the Kafka client layer: option translation, client choice, record batches."""

from __future__ import annotations

import pathlib
import re

import pyarrow as pa
import pytest

from engine.config import KafkaClientKind
from streams.errors import SourceConfigError, SourceError
from streams.kafka_backend import KafkaBackend, backend_for
from streams.kafka_client import PartitionReader, build_records, kafka_python_options, resolve_client_kind
from streams.records import RAW_SCHEMA


def test_dotted_and_librdkafka_names_translate_to_kafka_python():
    got = kafka_python_options({
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "PLAIN",
        "sasl.username": "u",
        "sasl.password": "p",
        "ssl.ca.location": "/ca.pem",
        "request_timeout_ms": "1234",
        "ssl_check_hostname": "false",
    })
    assert got == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
        "ssl_cafile": "/ca.pem",
        "request_timeout_ms": 1234,
        "ssl_check_hostname": False,
    }


def test_unknown_option_names_the_key():
    with pytest.raises(SourceConfigError, match="'no.such.thing'"):
        kafka_python_options({"no.such.thing": "1"})


def test_bad_value_type_names_key_and_value():
    with pytest.raises(SourceConfigError, match=r"'request_timeout_ms' = 'soon' is not a valid int"):
        kafka_python_options({"request_timeout_ms": "soon"})
    with pytest.raises(SourceConfigError, match="not a valid bool"):
        kafka_python_options({"ssl_check_hostname": "maybe"})


def test_options_of_other_clients_are_dropped_for_this_client():
    from kafka.admin import KafkaAdminClient

    got = kafka_python_options({"fetch_max_bytes": "100", "security_protocol": "SSL"}, KafkaAdminClient.DEFAULT_CONFIG)
    assert got == {"security_protocol": "SSL"}


def test_client_kind_resolution():
    assert resolve_client_kind(KafkaClientKind.KAFKA_PYTHON) is KafkaClientKind.KAFKA_PYTHON
    pytest.importorskip("confluent_kafka")
    assert resolve_client_kind(KafkaClientKind.AUTO) is KafkaClientKind.CONFLUENT
    assert resolve_client_kind(KafkaClientKind.CONFLUENT) is KafkaClientKind.CONFLUENT


def test_backend_is_chosen_once_per_client_and_implements_the_protocol():
    plain = backend_for(KafkaClientKind.KAFKA_PYTHON)
    assert isinstance(plain, KafkaBackend) and plain.kind is KafkaClientKind.KAFKA_PYTHON
    assert backend_for(KafkaClientKind.KAFKA_PYTHON) is plain
    pytest.importorskip("confluent_kafka")
    fast = backend_for(KafkaClientKind.CONFLUENT)
    assert isinstance(fast, KafkaBackend) and fast.kind is KafkaClientKind.CONFLUENT
    assert backend_for(KafkaClientKind.AUTO) is fast


def test_only_the_backend_resolver_branches_on_the_client_kind():
    # Everything else asks backend_for(); a new client is one new backend module.
    streams_dir = pathlib.Path(__file__).resolve().parents[2] / "streams"
    branching = sorted(
        path.name for path in streams_dir.glob("*.py")
        if path.name != "kafka_backend.py" and re.search(r"is(?: not)? KafkaClientKind\.", path.read_text())
    )
    assert branching == []


def test_build_records_schema_and_values():
    rb = build_records([5, 6], [10, -1], [b"a", b""])
    assert rb.schema == RAW_SCHEMA
    assert rb.column(0).to_pylist() == [5, 6]
    assert rb.column(2).to_pylist() == [b"a", b""]
    empty = build_records([], [], [])
    assert empty.num_rows == 0 and empty.schema == RAW_SCHEMA
    assert isinstance(empty, pa.RecordBatch)


class _ScriptedReader(PartitionReader):
    """The client side scripted: each _poll returns the next canned fetch result."""

    def __init__(self, results, start):
        super().__init__("t", 0, start, start)
        self._results = list(results)

    def _poll(self, max_records, timeout_ms):
        return self._results.pop(0)

    def _seek(self, offset):
        pass

    def watermarks(self):
        return 0, 0

    def close(self):
        pass


def test_poll_tiles_ranges_across_gaps_and_empty_advances():
    reader = _ScriptedReader([
        ([5, 7], [1, 2], [b"a", b"b"], 8),  # offset 6 compacted away
        ([], [], [], 8),  # nothing new
        ([], [], [], 10),  # position moved over two transaction markers
        ([10], [3], [b"c"], 11),
    ], start=5)
    b1 = reader.poll(10, 1)
    assert (b1.start_offset, b1.end_offset, b1.records.num_rows) == (5, 8, 2)
    assert reader.poll(10, 1) is None and reader.position() == 8
    b3 = reader.poll(10, 1)
    assert (b3.start_offset, b3.end_offset, b3.records.num_rows) == (8, 10, 0)
    b4 = reader.poll(10, 1)
    assert (b4.start_offset, b4.end_offset) == (10, 11)


def test_poll_refuses_records_below_the_position():
    reader = _ScriptedReader([([0, 1, 2], [0, 0, 0], [b"x"] * 3, 3)], start=10)
    with pytest.raises(SourceError, match="truncated or the topic recreated") as info:
        reader.poll(10, 1)
    assert info.value.retriable is False
    assert reader.position() == 10
