"""The one interface over the two Kafka clients, and the one place that picks a client.

``backend_for(kind)`` resolves ``SourceConfig.client`` once (``AUTO`` = confluent-kafka
when it imports, else kafka-python) and returns that client's ``KafkaBackend``; every
other module asks the backend and never looks at the kind again. Backends are stateless
and shared (one instance per client); each call opens and closes its own client
connection, except the reader and producer, which the caller closes.

Implementations: ``streams.backend_kafka_python`` (pure Python, always installed) and
``streams.backend_confluent`` (librdkafka, several times faster per record; the
``headrace[fast]`` extra). Both reconnect on their own when the broker goes away and
raise ``SourceError`` (``retriable`` set from the client's verdict) on failures.

Example::

    backend = backend_for(cfg.client)
    with backend.open_reader(cfg, "events", 0, start_offset=0, partition_start=0) as reader:
        batch = reader.poll(1000, 200)
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Protocol, runtime_checkable

from streams.config import KafkaClientKind, SourceConfig
from streams.errors import SourceConfigError
from streams.partition_reader import PartitionReader

__all__ = ["KafkaBackend", "ProducerClient", "backend_for", "resolve_client_kind"]


@runtime_checkable
class ProducerClient(Protocol):
    """One producer connection sending to explicit partitions.

    ``send`` queues a message (a None value is a tombstone) and blocks only while the
    client's local queue is full; a failed delivery is reported, as text, to the
    ``on_error`` callback given to ``open_producer``, never raised by ``send``. ``flush``
    blocks until every queued message is acknowledged or failed, at most ``timeout_s``
    (messages still queued then are reported to ``on_error``). ``close`` is idempotent.
    """

    def send(self, topic: str, value: bytes | None, partition: int, key: bytes | None,
             timestamp_ms: int | None) -> None: ...

    def flush(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class KafkaBackend(Protocol):
    """What the rest of ``streams`` needs from a Kafka client.

    All methods block (network round trips) and raise ``SourceError`` when the broker
    fails or cannot be reached, ``SourceConfigError`` when ``client_options`` are not
    accepted by this client.
    """

    kind: KafkaClientKind

    def open_reader(self, cfg: SourceConfig, topic: str, partition: int, start_offset: int,
                    partition_start: int) -> PartitionReader:
        """A reader on ``topic[partition]`` positioned at ``start_offset`` (manual
        assignment, nothing committed); ``partition_start`` is stamped on every batch."""

    def watermark_offsets(self, cfg: SourceConfig, topic: str, partitions: list[int]) -> dict[int, tuple[int, int]]:
        """``{partition: (low, high)}`` as the broker reports them."""

    def offsets_for_times(self, cfg: SourceConfig, topic: str, times_ms: Mapping[int, int]) -> dict[int, int | None]:
        """``{partition: the broker's offset for that time}``; None when it has none."""

    def commit_group_offsets(self, cfg: SourceConfig, offsets: Mapping[tuple[str, int], int]) -> None:
        """Commit ``{(topic, partition): next offset}`` for ``cfg.group_id`` synchronously."""

    def committed_group_offsets(self, cfg: SourceConfig,
                                partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        """``{(topic, partition): committed offset or None}`` for ``cfg.group_id``."""

    def open_producer(self, bootstrap: str, client_options: Mapping[str, str],
                      on_error: Callable[[str], None]) -> ProducerClient:
        """A producer for ``bootstrap``; see ``ProducerClient`` for delivery reporting."""


def resolve_client_kind(kind: KafkaClientKind) -> KafkaClientKind:
    """``AUTO`` -> ``CONFLUENT`` when confluent-kafka imports, else ``KAFKA_PYTHON``.

    Raises ``SourceConfigError`` when ``CONFLUENT`` is asked for but not installed.
    """
    if kind is KafkaClientKind.KAFKA_PYTHON:
        return kind
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        if kind is KafkaClientKind.CONFLUENT:
            raise SourceConfigError(
                "source.client = 'confluent' but confluent-kafka is not installed; "
                "pip install 'headrace[fast]' or set client = 'kafka-python'"
            ) from None
        return KafkaClientKind.KAFKA_PYTHON
    return KafkaClientKind.CONFLUENT


def backend_for(kind: KafkaClientKind) -> KafkaBackend:
    """The backend for ``kind`` (``AUTO`` resolved by ``resolve_client_kind``); shared."""
    return _backend(resolve_client_kind(kind))


@functools.cache
def _backend(kind: KafkaClientKind) -> KafkaBackend:
    # Imported on demand: confluent-kafka is optional, and neither client is loaded
    # until something actually talks to Kafka.
    if kind is KafkaClientKind.CONFLUENT:
        from streams.backend_confluent import ConfluentBackend

        return ConfluentBackend()
    from streams.backend_kafka_python import KafkaPythonBackend

    return KafkaPythonBackend()
