"""Read a Kafka partition and ask the broker for offsets, with the client the config picks.

The functions here are what pipelines call; each asks ``backend_for(cfg.client)``
(``streams.kafka_backend``) and never names a client itself. The reader contract (batches
``[start_offset, end_offset)`` that tile a partition without gaps or overlaps) is
``streams.partition_reader.PartitionReader``.

Client choice (``SourceConfig.client``): ``confluent`` (librdkafka, several times faster
per record) or ``kafka-python`` (pure Python, always installed); ``auto`` = confluent
when importable. ``SourceConfig.client_options`` are passed to the client: confluent
takes librdkafka property names verbatim (``security.protocol``, ``sasl.username``);
kafka-python takes its keyword names (``security_protocol``), and dotted names or the
common librdkafka names are translated (``sasl.username`` -> ``sasl_plain_username``).
Unknown names are a ``SourceConfigError`` naming the key.

Values are passed through untouched: oversize messages are dead-lettered downstream
(fetch sizes are raised so a message up to ``max_message_bytes`` can be fetched), and
null values (tombstones) become ``b""`` (dead-lettered downstream as empty messages).

Both clients reconnect on their own when the broker goes away: a poll during an outage
returns None (nothing read) and reading resumes from the same position later. Fatal
client errors raise ``SourceError``.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from streams.backend_kafka_python import kafka_python_options
from streams.config import SourceConfig, StartPosition
from streams.kafka_backend import backend_for, resolve_client_kind
from streams.offsets import log_end_offsets
from streams.partition_reader import PartitionReader, build_records

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
    Blocks while resolving a StartPosition (one metadata round trip; LATEST is confirmed
    by reading, because the embedded broker under-reports end offsets).
    """
    if start is StartPosition.LATEST:
        start = log_end_offsets(cfg, topic, [partition])[partition]
    elif isinstance(start, StartPosition):
        start = resolve_start_offsets(cfg, topic, [partition], start)[partition]
    if partition_start is None:
        partition_start = start
    return backend_for(cfg.client).open_reader(cfg, topic, partition, start, partition_start)


def watermark_offsets(cfg: SourceConfig, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
    """``{partition: (low, high)}`` as reported by the broker.

    Exact on Kafka; on the embedded Tansu broker ``high`` can be wrong, so never use it
    as a record count.
    """
    return backend_for(cfg.client).watermark_offsets(cfg, topic, list(partitions))


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
    by their own timestamp (``streams.offsets.exact_offsets_for_times`` does).
    """
    return backend_for(cfg.client).offsets_for_times(cfg, topic, times_ms)
