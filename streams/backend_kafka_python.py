"""kafka-python (pure Python, always installed) behind ``streams.kafka_backend.KafkaBackend``.

Also owns the translation of ``SourceConfig.client_options`` into kafka-python keyword
arguments (``kafka_python_options``), which the admin client uses too: kafka-python takes
its keyword names (``security_protocol``); dotted names and the common librdkafka names
are translated (``sasl.username`` -> ``sasl_plain_username``); unknown names are a
``SourceConfigError`` naming the key.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Mapping

import kafka.errors as ke
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.structs import OffsetAndMetadata

from streams.config import KafkaClientKind, SourceConfig
from streams.errors import SourceConfigError, SourceError
from streams.partition_reader import PartitionReader, fetch_bytes, tombstones_to_empty

__all__ = ["KafkaPythonBackend", "kafka_python_options"]

# librdkafka names users copy from Kafka docs -> kafka-python keyword names.
_LIBRDKAFKA_ALIASES = {
    "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_plain_username",
    "sasl.password": "sasl_plain_password",
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
    "ssl.key.password": "ssl_password",
}
_ALL_DEFAULTS: dict[str, Any] = {
    **KafkaConsumer.DEFAULT_CONFIG, **KafkaProducer.DEFAULT_CONFIG, **KafkaAdminClient.DEFAULT_CONFIG,
}

_get_offset = operator.attrgetter("offset")
_get_timestamp = operator.attrgetter("timestamp")
_get_value = operator.attrgetter("value")


def kafka_python_options(options: Mapping[str, str], accepted: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Translate ``client_options`` into kafka-python keyword arguments.

    ``accepted`` is the target client's ``DEFAULT_CONFIG`` (all kafka-python clients when
    None): options another kafka-python client knows but this one does not are dropped
    (e.g. fetch settings for the admin client); names no client knows raise
    ``SourceConfigError``. String values are converted to the type of the option's default
    (int, float, bool "true"/"false").
    """
    accepted = _ALL_DEFAULTS if accepted is None else accepted
    out: dict[str, Any] = {}
    for raw_key, value in options.items():
        key = _LIBRDKAFKA_ALIASES.get(raw_key, raw_key.replace(".", "_"))
        if key not in _ALL_DEFAULTS:
            raise SourceConfigError(
                f"source.client_options: {raw_key!r} is not a kafka-python option; use kafka-python "
                f"names (e.g. 'security_protocol', 'sasl_mechanism') or set client = 'confluent' "
                f"for librdkafka properties"
            )
        if key not in accepted:
            continue
        out[key] = _coerce(raw_key, value, _ALL_DEFAULTS[key])
    return out


def _coerce(key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            lowered = value.strip().lower()
            if lowered not in ("true", "false"):
                raise ValueError(value)
            return lowered == "true"
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise SourceConfigError(
            f"source.client_options: {key!r} = {value!r} is not a valid {type(default).__name__}"
        ) from None
    return value


def _consumer(cfg: SourceConfig) -> KafkaConsumer:
    """A group-less consumer for manual assignment; positions live in the batch cache."""
    partition_bytes, fetch_max = fetch_bytes(cfg)
    options = dict(
        bootstrap_servers=cfg.bootstrap.split(","),
        client_id="headrace",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=partition_bytes,
        fetch_max_bytes=fetch_max,
    )
    options.update(kafka_python_options(cfg.client_options, KafkaConsumer.DEFAULT_CONFIG))
    try:
        return KafkaConsumer(**options)
    except (ke.KafkaTimeoutError, ke.KafkaConnectionError) as exc:
        raise SourceError(f"no Kafka broker reachable at {cfg.bootstrap}: {exc!r}", retriable=True) from exc


def _group_consumer(cfg: SourceConfig) -> KafkaConsumer:
    """A consumer in ``cfg.group_id`` that never joins it: used only to commit/read offsets."""
    options = dict(bootstrap_servers=cfg.bootstrap.split(","), client_id="headrace-commit",
                   group_id=cfg.group_id, enable_auto_commit=False)
    options.update(kafka_python_options(cfg.client_options, KafkaConsumer.DEFAULT_CONFIG))
    return KafkaConsumer(**options)


class _Reader(PartitionReader):
    def __init__(self, cfg: SourceConfig, topic: str, partition: int, start_offset: int, partition_start: int):
        super().__init__(topic, partition, start_offset, partition_start)
        self._consumer = _consumer(cfg)
        self._tp = TopicPartition(topic, partition)
        self._consumer.assign([self._tp])
        self._consumer.seek(self._tp, start_offset)

    def _poll(self, max_records, timeout_ms):
        try:
            by_tp = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records, update_offsets=True)
        except ke.KafkaError as exc:
            raise SourceError(f"{self.topic}[{self.partition}]: kafka-python poll failed: {exc!r}",
                              retriable=bool(getattr(exc, "retriable", False))) from exc
        recs = by_tp.get(self._tp, ())
        if not recs:
            return [], [], [], self._position
        values = tombstones_to_empty(list(map(_get_value, recs)))
        return (list(map(_get_offset, recs)), list(map(_get_timestamp, recs)), values,
                self._consumer.position(self._tp))

    def _seek(self, offset):
        self._consumer.seek(self._tp, offset)

    def watermarks(self):
        low = self._consumer.beginning_offsets([self._tp])[self._tp]
        high = self._consumer.end_offsets([self._tp])[self._tp]
        return low, high

    def close(self):
        self._consumer.close(autocommit=False)


class _Producer:
    """``ProducerClient`` over ``KafkaProducer``."""

    def __init__(self, bootstrap: str, client_options: Mapping[str, str], on_error: Callable[[str], None]):
        options = dict(bootstrap_servers=bootstrap.split(","), client_id="headrace-producer", linger_ms=5)
        options.update(kafka_python_options(client_options, KafkaProducer.DEFAULT_CONFIG))
        self._producer = KafkaProducer(**options)
        self._errback = lambda exc: on_error(repr(exc))

    def send(self, topic, value, partition, key, timestamp_ms):
        if value is None and key is None:
            key = b""  # kafka-python refuses a message with neither key nor value
        future = self._producer.send(topic, value=value, key=key, partition=partition, timestamp_ms=timestamp_ms)
        future.add_errback(self._errback)

    def flush(self, timeout_s):
        self._producer.flush(timeout=timeout_s)

    def close(self):
        self._producer.close()


class KafkaPythonBackend:
    """``KafkaBackend`` over kafka-python; see ``streams.kafka_backend`` for the contract."""

    kind = KafkaClientKind.KAFKA_PYTHON

    def open_reader(self, cfg, topic, partition, start_offset, partition_start) -> PartitionReader:
        return _Reader(cfg, topic, partition, start_offset, partition_start)

    def watermark_offsets(self, cfg, topic, partitions):
        consumer = _consumer(cfg)
        try:
            tps = [TopicPartition(topic, p) for p in partitions]
            low = consumer.beginning_offsets(tps)
            high = consumer.end_offsets(tps)
            return {tp.partition: (low[tp], high[tp]) for tp in tps}
        finally:
            consumer.close(autocommit=False)

    def offsets_for_times(self, cfg, topic, times_ms):
        consumer = _consumer(cfg)
        try:
            got = consumer.offsets_for_times({TopicPartition(topic, p): t for p, t in times_ms.items()})
        finally:
            consumer.close(autocommit=False)
        return {tp.partition: (v.offset if v is not None else None) for tp, v in got.items()}

    def commit_group_offsets(self, cfg, offsets):
        consumer = _group_consumer(cfg)
        try:
            consumer.commit({TopicPartition(t, p): OffsetAndMetadata(int(o), "", -1) for (t, p), o in offsets.items()})
        except ke.KafkaError as exc:
            raise SourceError(f"group {cfg.group_id!r}: commit failed: {exc!r}", retriable=True) from exc
        finally:
            consumer.close(autocommit=False)

    def committed_group_offsets(self, cfg, partitions):
        consumer = _group_consumer(cfg)
        try:
            return {(t, p): consumer.committed(TopicPartition(t, p)) for t, p in partitions}
        finally:
            consumer.close(autocommit=False)

    def open_producer(self, bootstrap, client_options, on_error):
        return _Producer(bootstrap, client_options, on_error)
