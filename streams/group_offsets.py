"""Informational consumer-group commits: tell Kafka tooling how far the cache has got.

Positions live in the batch cache (``BatchCache.next_offsets()``); sources never resume
from these commits. Committing them anyway lets standard lag monitors (``kafka-consumer-
groups``, Burrow, Cruise Control) see ``source.group_id`` progress. Commits are
synchronous, carry no group generation (the group has no members: readers use manual
assignment), and are idempotent (committing the same offsets twice is harmless).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from engine.config.core import KafkaClientKind, SourceConfig
from engine.errors import SourceError
from streams.kafka_client import kafka_python_options, resolve_client_kind

__all__ = ["commit_group_offsets", "committed_group_offsets"]

_TIMEOUT_S = 10.0


def _kafka_python_group_consumer(cfg: SourceConfig):
    from kafka import KafkaConsumer

    options = dict(bootstrap_servers=cfg.bootstrap.split(","), client_id="headrace-commit",
                   group_id=cfg.group_id, enable_auto_commit=False)
    options.update(kafka_python_options(cfg.client_options, KafkaConsumer.DEFAULT_CONFIG))
    return KafkaConsumer(**options)


def _confluent_group_consumer(cfg: SourceConfig):
    import confluent_kafka as ck

    conf = {"bootstrap.servers": cfg.bootstrap, "client.id": "headrace-commit", "group.id": cfg.group_id,
            "enable.auto.commit": False}
    conf.update(cfg.client_options)
    return ck.Consumer(conf)


def commit_group_offsets(cfg: SourceConfig, offsets: Mapping[tuple[str, int], int]) -> None:
    """Commit ``{(topic, partition): next offset}`` for ``cfg.group_id``; blocks.

    Raises ``SourceError`` (retriable) when the broker rejects or cannot be reached.
    """
    if not offsets:
        return
    if resolve_client_kind(cfg.client) is KafkaClientKind.CONFLUENT:
        import confluent_kafka as ck

        consumer = _confluent_group_consumer(cfg)
        try:
            result = consumer.commit(offsets=[ck.TopicPartition(t, p, int(o)) for (t, p), o in offsets.items()],
                                     asynchronous=False)
            failed = [tp for tp in result if tp.error is not None]
            if failed:
                raise SourceError(f"group {cfg.group_id!r}: commit failed for {failed}", retriable=True)
        except ck.KafkaException as exc:
            raise SourceError(f"group {cfg.group_id!r}: commit failed: {exc}", retriable=True) from exc
        finally:
            consumer.close()
        return
    import kafka.errors as ke
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = _kafka_python_group_consumer(cfg)
    try:
        consumer.commit({TopicPartition(t, p): OffsetAndMetadata(int(o), "", -1) for (t, p), o in offsets.items()})
    except ke.KafkaError as exc:
        raise SourceError(f"group {cfg.group_id!r}: commit failed: {exc!r}", retriable=True) from exc
    finally:
        consumer.close(autocommit=False)


def committed_group_offsets(
    cfg: SourceConfig, partitions: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], int | None]:
    """``{(topic, partition): committed offset or None}`` for ``cfg.group_id``."""
    partitions = list(partitions)
    if resolve_client_kind(cfg.client) is KafkaClientKind.CONFLUENT:
        import confluent_kafka as ck

        consumer = _confluent_group_consumer(cfg)
        try:
            got = consumer.committed([ck.TopicPartition(t, p) for t, p in partitions], timeout=_TIMEOUT_S)
        except ck.KafkaException as exc:
            raise SourceError(f"group {cfg.group_id!r}: reading commits failed: {exc}", retriable=True) from exc
        finally:
            consumer.close()
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in got}
    from kafka import TopicPartition

    consumer = _kafka_python_group_consumer(cfg)
    try:
        return {(t, p): consumer.committed(TopicPartition(t, p)) for t, p in partitions}
    finally:
        consumer.close(autocommit=False)
