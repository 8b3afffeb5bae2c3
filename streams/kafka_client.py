"""One small interface over two Kafka clients: kafka-python and confluent-kafka.

A ``PartitionReader`` reads ONE partition by manual assignment (no group membership, no
rebalancing): the caller says where to start, because positions come from the batch
cache; nothing is committed to the consumer group. Each ``poll`` returns a
``SourceBatch`` whose offsets ``[start_offset, end_offset)`` continue exactly where the
previous batch ended (``start_offset`` = the reader's position before the poll,
``end_offset`` = its position after), so consecutive batches tile the partition without
gaps or overlaps. Offsets inside a batch's range with no record (compaction,
transaction markers, data deleted by retention before we got there) simply have no row.

Client choice (``SourceConfig.client``): ``confluent`` (librdkafka, several times faster
per record) or ``kafka-python`` (pure Python, always installed); ``auto`` = confluent
when importable. ``SourceConfig.client_options`` are passed to the client: confluent
takes librdkafka property names verbatim (``security.protocol``, ``sasl.username``);
kafka-python takes its keyword names (``security_protocol``), and dotted names or the
common librdkafka names are translated (``sasl.username`` -> ``sasl_plain_username``).
Unknown names are a ``ConfigError`` naming the key.

Values are passed through untouched: oversize messages are dead-lettered downstream
(fetch sizes are raised so a message up to ``max_message_bytes`` can be fetched), and
null values (tombstones) become ``b""`` (dead-lettered downstream as empty messages).

Both clients reconnect on their own when the broker goes away: a poll during an outage
returns None (nothing read) and reading resumes from the same position later. Fatal
client errors raise ``SourceError``.
"""

from __future__ import annotations

import abc
import logging
import operator
from typing import Any, Iterable, Mapping

import pyarrow as pa

from engine.config.core import KafkaClientKind, SourceConfig, StartPosition
from engine.errors import ConfigError, SourceError
from streams.records import RAW_SCHEMA, SourceBatch

__all__ = [
    "PartitionReader",
    "open_reader",
    "resolve_client_kind",
    "resolve_start_offsets",
    "watermark_offsets",
    "offsets_for_times",
    "kafka_python_options",
    "build_records",
]

log = logging.getLogger(__name__)

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
# Headroom above max_message_bytes for record-batch and fetch-response framing.
_FETCH_OVERHEAD_BYTES = 64 * 1024
_DEFAULT_PARTITION_FETCH_BYTES = 1 << 20
_DEFAULT_FETCH_MAX_BYTES = 50 << 20
_METADATA_TIMEOUT_S = 10.0

_get_offset = operator.attrgetter("offset")
_get_timestamp = operator.attrgetter("timestamp")
_get_value = operator.attrgetter("value")


def _tombstones_to_empty(values: list) -> list:
    """Null values (tombstones) become b"" in place (dead-lettered downstream)."""
    if None in values:
        for i, v in enumerate(values):
            if v is None:
                values[i] = b""
    return values


def _all_kafka_python_defaults() -> dict[str, Any]:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    merged: dict[str, Any] = {}
    for cls in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        merged.update(cls.DEFAULT_CONFIG)
    return merged


def kafka_python_options(options: Mapping[str, str], accepted: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Translate ``client_options`` into kafka-python keyword arguments.

    ``accepted`` is the target client's ``DEFAULT_CONFIG`` (all kafka-python clients when
    None): options another kafka-python client knows but this one does not are dropped
    (e.g. fetch settings for the admin client); names no client knows raise
    ``ConfigError``. String values are converted to the type of the option's default
    (int, float, bool "true"/"false").
    """
    known = _all_kafka_python_defaults()
    accepted = known if accepted is None else accepted
    out: dict[str, Any] = {}
    for raw_key, value in options.items():
        key = _LIBRDKAFKA_ALIASES.get(raw_key, raw_key.replace(".", "_"))
        if key not in known:
            raise ConfigError(
                f"source.client_options: {raw_key!r} is not a kafka-python option; use kafka-python "
                f"names (e.g. 'security_protocol', 'sasl_mechanism') or set client = 'confluent' "
                f"for librdkafka properties"
            )
        if key not in accepted:
            continue
        out[key] = _coerce(raw_key, value, known[key])
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
        raise ConfigError(
            f"source.client_options: {key!r} = {value!r} is not a valid {type(default).__name__}"
        ) from None
    return value


def resolve_client_kind(kind: KafkaClientKind) -> KafkaClientKind:
    """``AUTO`` -> ``CONFLUENT`` when confluent-kafka imports, else ``KAFKA_PYTHON``.

    Raises ``ConfigError`` when ``CONFLUENT`` is asked for but not installed.
    """
    if kind is KafkaClientKind.KAFKA_PYTHON:
        return kind
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        if kind is KafkaClientKind.CONFLUENT:
            raise ConfigError(
                "source.client = 'confluent' but confluent-kafka is not installed; "
                "pip install 'headrace[fast]' or set client = 'kafka-python'"
            ) from None
        return KafkaClientKind.KAFKA_PYTHON
    return KafkaClientKind.CONFLUENT


def build_records(offsets: list[int], timestamps_ms: list[int], values: list[bytes]) -> pa.RecordBatch:
    """A ``RAW_SCHEMA`` record batch from three equally long lists (values already bytes)."""
    return pa.RecordBatch.from_arrays(
        [pa.array(offsets, pa.int64()), pa.array(timestamps_ms, pa.int64()), pa.array(values, pa.binary())],
        schema=RAW_SCHEMA,
    )


def _fetch_bytes(cfg: SourceConfig) -> tuple[int, int]:
    partition_bytes = max(_DEFAULT_PARTITION_FETCH_BYTES, cfg.max_message_bytes + _FETCH_OVERHEAD_BYTES)
    return partition_bytes, max(_DEFAULT_FETCH_MAX_BYTES, partition_bytes)


class PartitionReader(abc.ABC):
    """Reads one partition from a position; see the module docstring for the contract.

    Not thread-safe. ``poll`` blocks up to ``timeout_ms``; returns None when nothing was
    read and the position did not move, else a batch (possibly with zero rows when the
    position skipped offsets that hold no records).
    """

    def __init__(self, topic: str, partition: int, start_offset: int, partition_start: int):
        if start_offset < 0:
            raise SourceError(f"{topic}[{partition}]: start offset must be >= 0, got {start_offset}", retriable=False)
        self.topic = topic
        self.partition = partition
        self.partition_start = partition_start
        self._position = start_offset

    def position(self) -> int:
        """The next offset this reader will return (the end of the last batch)."""
        return self._position

    def seek(self, offset: int) -> None:
        """Continue reading at ``offset`` (the next batch starts there)."""
        if offset < 0:
            raise SourceError(f"{self.topic}[{self.partition}]: seek offset must be >= 0, got {offset}", retriable=False)
        self._seek(offset)
        self._position = offset

    def poll(self, max_records: int, timeout_ms: int) -> SourceBatch | None:
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        offsets, timestamps_ms, values, next_position = self._poll(max_records, timeout_ms)
        if not offsets and next_position <= self._position:
            return None
        if offsets and offsets[0] < self._position:
            # The client reset to an earlier offset: our position lay beyond the log end,
            # so the log was truncated or the topic recreated. Continuing would re-read
            # or mislabel records; the stored offsets no longer describe this partition.
            raise SourceError(
                f"{self.topic}[{self.partition}]: broker returned offset {offsets[0]} below the read "
                f"position {self._position}: the partition was truncated or the topic recreated; "
                f"the cached offsets no longer match it (use a fresh cache or another topic)",
                retriable=False,
            )
        if offsets:
            next_position = max(next_position, offsets[-1] + 1)
        batch = SourceBatch(
            topic=self.topic,
            partition=self.partition,
            start_offset=self._position,
            end_offset=next_position,
            partition_start=self.partition_start,
            records=build_records(offsets, timestamps_ms, values),
        )
        self._position = next_position
        return batch

    @abc.abstractmethod
    def _poll(self, max_records: int, timeout_ms: int) -> tuple[list[int], list[int], list[bytes], int]:
        """Fetch up to ``max_records``; return offsets, timestamps, values, client position."""

    @abc.abstractmethod
    def _seek(self, offset: int) -> None: ...

    @abc.abstractmethod
    def watermarks(self) -> tuple[int, int]:
        """``(low, high)`` offsets as the broker reports them (high is approximate on Tansu)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "PartitionReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _KafkaPythonReader(PartitionReader):
    def __init__(self, cfg: SourceConfig, topic: str, partition: int, start_offset: int, partition_start: int):
        super().__init__(topic, partition, start_offset, partition_start)
        from kafka import TopicPartition

        self._consumer = _kafka_python_consumer(cfg)
        self._tp = TopicPartition(topic, partition)
        self._consumer.assign([self._tp])
        self._consumer.seek(self._tp, start_offset)

    def _poll(self, max_records, timeout_ms):
        import kafka.errors as ke

        try:
            by_tp = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records, update_offsets=True)
        except ke.KafkaError as exc:
            raise SourceError(f"{self.topic}[{self.partition}]: kafka-python poll failed: {exc!r}",
                              retriable=bool(getattr(exc, "retriable", False))) from exc
        recs = by_tp.get(self._tp, ())
        if not recs:
            return [], [], [], self._position
        values = _tombstones_to_empty(list(map(_get_value, recs)))
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


def _kafka_python_consumer(cfg: SourceConfig):
    from kafka import KafkaConsumer

    partition_bytes, fetch_max = _fetch_bytes(cfg)
    options = dict(
        bootstrap_servers=cfg.bootstrap.split(","),
        client_id="headrace",
        group_id=None,  # manual assignment; positions live in the batch cache
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=partition_bytes,
        fetch_max_bytes=fetch_max,
    )
    options.update(kafka_python_options(cfg.client_options, KafkaConsumer.DEFAULT_CONFIG))
    import kafka.errors as ke

    try:
        return KafkaConsumer(**options)
    except (ke.KafkaTimeoutError, ke.KafkaConnectionError) as exc:
        raise SourceError(f"no Kafka broker reachable at {cfg.bootstrap}: {exc!r}", retriable=True) from exc


class _ConfluentReader(PartitionReader):
    def __init__(self, cfg: SourceConfig, topic: str, partition: int, start_offset: int, partition_start: int):
        super().__init__(topic, partition, start_offset, partition_start)
        import confluent_kafka as ck

        self._ck = ck
        self._consumer = _confluent_consumer(cfg)
        self._consumer.assign([ck.TopicPartition(topic, partition, start_offset)])

    def _poll(self, max_records, timeout_ms):
        # librdkafka caps one consume() at 1M messages.
        msgs = self._consumer.consume(num_messages=min(max_records, 1_000_000), timeout=timeout_ms / 1000.0)
        if not msgs:
            return [], [], [], self._position
        # Hot path: unbound C methods mapped over the list keep per-record Python work
        # to a minimum (about 3x faster than attribute lookups in comprehensions).
        message = self._ck.Message
        if any(map(message.error, msgs)):
            msgs = self._drop_errors(msgs)
            if not msgs:
                return [], [], [], self._position
        offsets = list(map(message.offset, msgs))
        timestamps_ms = [ts for _, ts in map(message.timestamp, msgs)]
        values = _tombstones_to_empty(list(map(message.value, msgs)))
        return offsets, timestamps_ms, values, offsets[-1] + 1

    def _drop_errors(self, msgs):
        good = []
        for m in msgs:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.code() == self._ck.KafkaError._PARTITION_EOF:
                continue
            elif err.fatal() or not err.retriable() and err.code() not in _CONFLUENT_TRANSIENT:
                # Return nothing from a failed poll: the position does not move, so no
                # record is skipped, and the error reaches the caller.
                raise SourceError(f"{self.topic}[{self.partition}]: confluent-kafka error {err}",
                                  retriable=not err.fatal())
            else:
                log.warning("%s[%d]: transient Kafka error, the client retries: %s", self.topic, self.partition, err)
        return good

    def _seek(self, offset):
        ck = self._ck
        # seek() needs an active fetcher; re-assigning works in every state.
        self._consumer.assign([ck.TopicPartition(self.topic, self.partition, offset)])

    def watermarks(self):
        tp = self._ck.TopicPartition(self.topic, self.partition)
        return self._consumer.get_watermark_offsets(tp, timeout=_METADATA_TIMEOUT_S, cached=False)

    def close(self):
        self._consumer.close()


def _confluent_transient_codes() -> frozenset[int]:
    try:
        from confluent_kafka import KafkaError
    except ImportError:
        return frozenset()
    return frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                      KafkaError._RESOLVE, KafkaError.LEADER_NOT_AVAILABLE,
                      KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART})


_CONFLUENT_TRANSIENT = _confluent_transient_codes()


def _confluent_config(cfg: SourceConfig) -> dict[str, Any]:
    partition_bytes, fetch_max = _fetch_bytes(cfg)
    conf: dict[str, Any] = {
        "bootstrap.servers": cfg.bootstrap,
        "client.id": "headrace",
        # Required by librdkafka even for manual assignment; nothing is committed.
        "group.id": cfg.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        "auto.offset.reset": "earliest",
        "max.partition.fetch.bytes": partition_bytes,
        "fetch.max.bytes": fetch_max,
        "receive.message.max.bytes": fetch_max + _FETCH_OVERHEAD_BYTES,
    }
    conf.update(cfg.client_options)
    return conf


def _confluent_consumer(cfg: SourceConfig):
    import confluent_kafka as ck

    try:
        return ck.Consumer(_confluent_config(cfg))
    except ck.KafkaException as exc:
        raise ConfigError(f"source.client_options rejected by librdkafka: {exc}") from exc


def open_reader(
    cfg: SourceConfig,
    topic: str,
    partition: int,
    start: int | StartPosition,
    *,
    partition_start: int | None = None,
) -> PartitionReader:
    """Open a reader on ``topic[partition]`` at ``start`` (an offset or a StartPosition).

    ``partition_start`` (stamped on every batch) defaults to the resolved start offset.
    Blocks while resolving a StartPosition (one metadata round trip).
    """
    if start is StartPosition.LATEST:
        # Confirmed by reading (the embedded broker under-reports end offsets);
        # imported here because streams.offsets builds on this module.
        from streams.offsets import log_end_offsets

        start = log_end_offsets(cfg, topic, [partition])[partition]
    elif isinstance(start, StartPosition):
        start = resolve_start_offsets(cfg, topic, [partition], start)[partition]
    if partition_start is None:
        partition_start = start
    kind = resolve_client_kind(cfg.client)
    cls = _ConfluentReader if kind is KafkaClientKind.CONFLUENT else _KafkaPythonReader
    return cls(cfg, topic, partition, start, partition_start)


def watermark_offsets(cfg: SourceConfig, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
    """``{partition: (low, high)}`` as reported by the broker.

    Exact on Kafka; on the embedded Tansu broker ``high`` can be wrong, so never use it
    as a record count.
    """
    partitions = list(partitions)
    if resolve_client_kind(cfg.client) is KafkaClientKind.CONFLUENT:
        import confluent_kafka as ck

        consumer = _confluent_consumer(cfg)
        try:
            return {p: tuple(consumer.get_watermark_offsets(ck.TopicPartition(topic, p), timeout=_METADATA_TIMEOUT_S,
                                                             cached=False)) for p in partitions}
        except ck.KafkaException as exc:
            raise SourceError(f"watermark offsets of {topic!r} on {cfg.bootstrap}: {exc}", retriable=True) from exc
        finally:
            consumer.close()
    from kafka import TopicPartition

    consumer = _kafka_python_consumer(cfg)
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        low = consumer.beginning_offsets(tps)
        high = consumer.end_offsets(tps)
        return {tp.partition: (low[tp], high[tp]) for tp in tps}
    finally:
        consumer.close(autocommit=False)


def resolve_start_offsets(
    cfg: SourceConfig, topic: str, partitions: Iterable[int], start: StartPosition
) -> dict[int, int]:
    """``{partition: offset}`` for EARLIEST (low watermark) or LATEST (high watermark as
    the broker reports it: exact on Kafka; use ``streams.offsets.log_end_offsets`` for a
    value confirmed by reading)."""
    marks = watermark_offsets(cfg, topic, partitions)
    index = 0 if start is StartPosition.EARLIEST else 1
    return {p: int(m[index]) for p, m in marks.items()}


def offsets_for_times(cfg: SourceConfig, topic: str, times_ms: Mapping[int, int]) -> dict[int, int | None]:
    """``{partition: earliest offset whose timestamp >= time}``; None when no such record.

    Kafka answers exactly; Tansu answers with the base offset of the record batch that
    contains the first match (an earlier offset), so callers must still filter records
    by their own timestamp.
    """
    if resolve_client_kind(cfg.client) is KafkaClientKind.CONFLUENT:
        import confluent_kafka as ck

        consumer = _confluent_consumer(cfg)
        try:
            got = consumer.offsets_for_times([ck.TopicPartition(topic, p, t) for p, t in times_ms.items()],
                                             timeout=_METADATA_TIMEOUT_S)
        except ck.KafkaException as exc:
            raise SourceError(f"offsets_for_times on {topic!r}: {exc}", retriable=True) from exc
        finally:
            consumer.close()
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in got}
    from kafka import TopicPartition

    consumer = _kafka_python_consumer(cfg)
    try:
        got = consumer.offsets_for_times({TopicPartition(topic, p): t for p, t in times_ms.items()})
    finally:
        consumer.close(autocommit=False)
    return {tp.partition: (v.offset if v is not None else None) for tp, v in got.items()}
