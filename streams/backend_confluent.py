"""confluent-kafka (librdkafka) behind ``streams.kafka_backend.KafkaBackend``.

Imported only when ``backend_for`` resolves to ``CONFLUENT`` (confluent-kafka is the
optional ``headrace[fast]`` extra). ``client_options`` are librdkafka property names,
passed verbatim (``security.protocol``, ``sasl.username``); librdkafka rejecting one is a
``SourceConfigError``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import confluent_kafka as ck

from streams.config import KafkaClientKind, SourceConfig
from streams.errors import SourceConfigError, SourceError
from streams.partition_reader import FETCH_OVERHEAD_BYTES, PartitionReader, fetch_bytes, tombstones_to_empty

__all__ = ["ConfluentBackend"]

log = logging.getLogger(__name__)

_METADATA_TIMEOUT_S = 10.0
# librdkafka (2.x) stops fetching for fetch.queue.backoff.ms (default 1000 ms) whenever its
# local queue holds more than queued.min.messages, so a reader that spends ~10 ms processing
# each batch finds the queue drained and waits for a fresh fetch at every poll: measured on
# the bundled broker, a consume(4096) loop with 9 ms of work per batch spent 2.4 s of 3.3 s
# waiting in consume at 1000 ms, and 1.2 s at 10 ms (bench/ingest.py: 87k -> 110k events/s).
_FETCH_QUEUE_BACKOFF_MS = 10
# librdkafka caps one consume() at 1M messages.
_MAX_CONSUME_MESSAGES = 1_000_000
# Errors librdkafka recovers from by itself (it reconnects, re-resolves, finds the new
# leader): logged, and the poll returns what was read.
_TRANSIENT_CODES = frozenset({
    ck.KafkaError._TRANSPORT, ck.KafkaError._ALL_BROKERS_DOWN, ck.KafkaError._TIMED_OUT, ck.KafkaError._RESOLVE,
    ck.KafkaError.LEADER_NOT_AVAILABLE, ck.KafkaError.NOT_LEADER_FOR_PARTITION, ck.KafkaError.UNKNOWN_TOPIC_OR_PART,
})


def _consumer_config(cfg: SourceConfig) -> dict[str, Any]:
    partition_bytes, fetch_max = fetch_bytes(cfg)
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
        "receive.message.max.bytes": fetch_max + FETCH_OVERHEAD_BYTES,
        "fetch.queue.backoff.ms": _FETCH_QUEUE_BACKOFF_MS,
    }
    conf.update(cfg.client_options)
    return conf


def _consumer(cfg: SourceConfig) -> ck.Consumer:
    try:
        return ck.Consumer(_consumer_config(cfg))
    except ck.KafkaException as exc:
        raise SourceConfigError(f"source.client_options rejected by librdkafka: {exc}") from exc


def _group_consumer(cfg: SourceConfig) -> ck.Consumer:
    """A consumer in ``cfg.group_id`` that never subscribes: used only to commit/read offsets."""
    conf = {"bootstrap.servers": cfg.bootstrap, "client.id": "headrace-commit", "group.id": cfg.group_id,
            "enable.auto.commit": False}
    conf.update(cfg.client_options)
    return ck.Consumer(conf)


class _Reader(PartitionReader):
    def __init__(self, cfg: SourceConfig, topic: str, partition: int, start_offset: int, partition_start: int):
        super().__init__(topic, partition, start_offset, partition_start)
        self._consumer = _consumer(cfg)
        self._consumer.assign([ck.TopicPartition(topic, partition, start_offset)])

    def _poll(self, max_records, timeout_ms):
        msgs = self._consumer.consume(num_messages=min(max_records, _MAX_CONSUME_MESSAGES),
                                      timeout=timeout_ms / 1000.0)
        if not msgs:
            return [], [], [], self._position
        # Hot path: unbound C methods mapped over the list keep per-record Python work
        # to a minimum (about 3x faster than attribute lookups in comprehensions).
        message = ck.Message
        if any(map(message.error, msgs)):
            msgs = self._drop_errors(msgs)
            if not msgs:
                return [], [], [], self._position
        offsets = list(map(message.offset, msgs))
        timestamps_ms = [ts for _, ts in map(message.timestamp, msgs)]
        values = tombstones_to_empty(list(map(message.value, msgs)))
        return offsets, timestamps_ms, values, offsets[-1] + 1

    def _drop_errors(self, msgs):
        good = []
        for m in msgs:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.code() == ck.KafkaError._PARTITION_EOF:
                continue
            elif err.fatal() or not err.retriable() and err.code() not in _TRANSIENT_CODES:
                # Return nothing from a failed poll: the position does not move, so no
                # record is skipped, and the error reaches the caller.
                raise SourceError(f"{self.topic}[{self.partition}]: confluent-kafka error {err}",
                                  retriable=not err.fatal())
            else:
                log.warning("%s[%d]: transient Kafka error, the client retries: %s", self.topic, self.partition, err)
        return good

    def _seek(self, offset):
        # seek() needs an active fetcher; re-assigning works in every state.
        self._consumer.assign([ck.TopicPartition(self.topic, self.partition, offset)])

    def watermarks(self):
        tp = ck.TopicPartition(self.topic, self.partition)
        return self._consumer.get_watermark_offsets(tp, timeout=_METADATA_TIMEOUT_S, cached=False)

    def close(self):
        self._consumer.close()


class _Producer:
    """``ProducerClient`` over ``confluent_kafka.Producer``."""

    def __init__(self, bootstrap: str, client_options: Mapping[str, str], on_error: Callable[[str], None]):
        conf = {"bootstrap.servers": bootstrap, "client.id": "headrace-producer", "linger.ms": 5}
        conf.update(client_options)
        self._producer = ck.Producer(conf)
        self._on_error = on_error

    def _on_delivery(self, err, msg):
        if err is not None:
            self._on_error(str(err))

    def send(self, topic, value, partition, key, timestamp_ms):
        kwargs = {"partition": partition, "on_delivery": self._on_delivery}
        if key is not None:
            kwargs["key"] = key
        if timestamp_ms is not None:
            kwargs["timestamp"] = timestamp_ms
        while True:
            try:
                self._producer.produce(topic, value, **kwargs)
                break
            except BufferError:
                # Local queue full: serve delivery callbacks until there is room.
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self, timeout_s):
        remaining = self._producer.flush(timeout_s)
        if remaining:
            self._on_error(f"{remaining} message(s) still undelivered after {timeout_s:g} s")

    def close(self):
        pass  # nothing to release early: librdkafka frees the producer with the object


class ConfluentBackend:
    """``KafkaBackend`` over confluent-kafka; see ``streams.kafka_backend`` for the contract."""

    kind = KafkaClientKind.CONFLUENT

    def open_reader(self, cfg, topic, partition, start_offset, partition_start) -> PartitionReader:
        return _Reader(cfg, topic, partition, start_offset, partition_start)

    def watermark_offsets(self, cfg, topic, partitions):
        consumer = _consumer(cfg)
        try:
            return {p: tuple(consumer.get_watermark_offsets(ck.TopicPartition(topic, p), timeout=_METADATA_TIMEOUT_S,
                                                             cached=False)) for p in partitions}
        except ck.KafkaException as exc:
            raise SourceError(f"watermark offsets of {topic!r} on {cfg.bootstrap}: {exc}", retriable=True) from exc
        finally:
            consumer.close()

    def offsets_for_times(self, cfg, topic, times_ms):
        consumer = _consumer(cfg)
        try:
            got = consumer.offsets_for_times([ck.TopicPartition(topic, p, t) for p, t in times_ms.items()],
                                             timeout=_METADATA_TIMEOUT_S)
        except ck.KafkaException as exc:
            raise SourceError(f"offsets_for_times on {topic!r}: {exc}", retriable=True) from exc
        finally:
            consumer.close()
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in got}

    def commit_group_offsets(self, cfg, offsets):
        consumer = _group_consumer(cfg)
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

    def committed_group_offsets(self, cfg, partitions):
        consumer = _group_consumer(cfg)
        try:
            got = consumer.committed([ck.TopicPartition(t, p) for t, p in partitions], timeout=_METADATA_TIMEOUT_S)
        except ck.KafkaException as exc:
            raise SourceError(f"group {cfg.group_id!r}: reading commits failed: {exc}", retriable=True) from exc
        finally:
            consumer.close()
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in got}

    def open_producer(self, bootstrap, client_options, on_error):
        return _Producer(bootstrap, client_options, on_error)
