"""Produce events into Kafka: lines of log files, or a sequence of values.

Used by ``headrace produce``, the demo and tests. Both functions block until every
message is acknowledged by the broker (``flush``) and return the number acknowledged;
any delivery failure raises ``SourceError`` naming the topic and the first error after
the rest were flushed. Messages go to explicit partitions (round-robin, or by a stable
hash of a key), so the placement is the same with either client and across runs.
"""

from __future__ import annotations

import csv
import time
import zlib
from typing import Callable, Iterable, Mapping, Sequence

import orjson

from streams.admin import list_partitions
from streams.config import KafkaClientKind
from streams.errors import SourceError
from streams.kafka_backend import backend_for
from streams.logfiles import LogFormat, iter_records, log_format

__all__ = ["TokenBucket", "produce_values", "produce_file", "key_partition", "line_key"]

_FLUSH_TIMEOUT_S = 120.0


class TokenBucket:
    """Rate limiter: ``rate_per_s`` tokens per second, at most ``burst`` banked.

    Pure arithmetic over the clock passed in (monotonic seconds), so it is tested with
    literal times. ``take(now_s)`` consumes one token and returns how long the caller
    must sleep before sending (0.0 when a token was available).
    """

    def __init__(self, rate_per_s: float, burst: float | None = None, *, now_s: float = 0.0):
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst if burst is not None else max(1.0, rate_per_s / 10))
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self._tokens = self.burst
        self._last_s = now_s

    def take(self, now_s: float) -> float:
        elapsed_s = max(0.0, now_s - self._last_s)
        self._last_s = max(self._last_s, now_s)
        self._tokens = min(self.burst, self._tokens + elapsed_s * self.rate_per_s)
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        # Negative balance = debt; paying it off takes |tokens| / rate seconds.
        return -self._tokens / self.rate_per_s


def key_partition(key: bytes, partitions: int) -> int:
    """Stable partition of ``key`` (CRC-32 mod partitions), independent of the client."""
    return zlib.crc32(key) % partitions


def line_key(line: bytes, fmt: LogFormat, key_field: str | int) -> bytes | None:
    """The key of one log line: a JSON field (by name) or a TSV/CSV column (by 0-based index).

    None when the line has no such field/column or does not parse; such lines are placed
    round-robin (they are still produced: bad events are dead-lettered downstream).
    """
    if fmt in (LogFormat.TSV, LogFormat.CSV):
        if not isinstance(key_field, int):
            raise ValueError(f"key_field for a {fmt.value.upper()} file must be a column index, got {key_field!r}")
        if fmt is LogFormat.TSV:
            cols = line.split(b"\t")
        else:
            try:
                cols = [c.encode() for c in next(csv.reader([line.decode("utf-8")], strict=True), [])]
            except (UnicodeDecodeError, csv.Error):
                return None
        return cols[key_field] if 0 <= key_field < len(cols) else None
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or key_field not in obj or obj[key_field] is None:
        return None
    value = obj[key_field]
    return value.encode() if isinstance(value, str) else orjson.dumps(value)


class _Sender:
    """Send to explicit partitions through the client's producer; collect delivery errors."""

    def __init__(self, bootstrap: str, client: KafkaClientKind, client_options: Mapping[str, str]):
        self.errors: list[str] = []
        self.sent = 0
        self._producer = backend_for(client).open_producer(bootstrap, client_options, self.errors.append)

    def send(self, topic: str, value: bytes | None, partition: int, key: bytes | None, timestamp_ms: int | None):
        self._producer.send(topic, value, partition, key, timestamp_ms)
        self.sent += 1

    def flush(self) -> None:
        self._producer.flush(_FLUSH_TIMEOUT_S)

    def close(self) -> None:
        self._producer.close()


def _finish(sender: _Sender, topic: str) -> int:
    sender.flush()
    sender.close()
    if sender.errors:
        raise SourceError(
            f"produce to {topic!r}: {len(sender.errors)} of {sender.sent} message(s) failed; first: {sender.errors[0]}",
            retriable=True,
        )
    return sender.sent


def produce_values(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | None],
    *,
    partition: int | None = None,
    timestamps_ms: Sequence[int] | None = None,
    keys: Sequence[bytes | None] | None = None,
    client: KafkaClientKind = KafkaClientKind.AUTO,
    client_options: Mapping[str, str] | None = None,
) -> int:
    """Produce each value (None = tombstone) to ``topic``; return the number delivered.

    ``partition``: all to that partition; None = round-robin over the topic's
    partitions, or by ``key_partition`` when ``keys`` is given. ``timestamps_ms[i]`` /
    ``keys[i]`` apply to the i-th value. Blocks until all are acknowledged.
    """
    options = dict(client_options or {})
    n_partitions = 1 if partition is not None else len(list_partitions(bootstrap, topic, client_options=options))
    sender = _Sender(bootstrap, client, options)
    try:
        for i, value in enumerate(values):
            key = keys[i] if keys is not None else None
            if partition is not None:
                target = partition
            elif key is not None:
                target = key_partition(key, n_partitions)
            else:
                target = i % n_partitions
            sender.send(topic, value, target, key, timestamps_ms[i] if timestamps_ms is not None else None)
    except BaseException:
        sender.close()
        raise
    return _finish(sender, topic)


def produce_file(
    bootstrap: str,
    topic: str,
    path: str,
    *,
    rate_events_per_s: float | None = None,
    key_field: str | int | None = None,
    limit: int | None = None,
    client: KafkaClientKind = KafkaClientKind.AUTO,
    client_options: Mapping[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    csv_header: bool = True,
) -> int:
    """Produce each line of a ``.jsonl``/``.tsv``/``.csv`` file (optionally ``.gz``) as one
    message; a CSV record with quoted line breaks is one message (``logfiles.iter_records``).

    With ``csv_header`` a CSV file's header record is not sent (consumers name the columns
    with ``[schema] columns``). Lines go round-robin over the partitions, or, with
    ``key_field`` (JSON field name, or TSV/CSV column index), to ``key_partition(key)`` with
    the key set on the message; lines without the key go round-robin. Blank lines are sent
    as empty messages (they are dead-lettered downstream, like in a file replay).
    ``rate_events_per_s`` caps the send rate with a token bucket; ``limit`` stops after
    that many messages. Returns the number delivered; blocks until all are acknowledged.
    """
    fmt = log_format(path)
    options = dict(client_options or {})
    n_partitions = len(list_partitions(bootstrap, topic, client_options=options))
    bucket = TokenBucket(rate_events_per_s, now_s=clock()) if rate_events_per_s else None
    sender = _Sender(bootstrap, client, options)
    try:
        records = (line for _, _, line in iter_records(path))
        if csv_header and fmt is LogFormat.CSV:
            next(records, None)
        for i, line in enumerate(records):
            if limit is not None and i >= limit:
                break
            if bucket is not None:
                wait_s = bucket.take(clock())
                if wait_s > 0:
                    sleep(wait_s)
            key = line_key(line, fmt, key_field) if key_field is not None else None
            target = key_partition(key, n_partitions) if key is not None else i % n_partitions
            sender.send(topic, line, target, key, None)
    except BaseException:
        sender.close()
        raise
    return _finish(sender, topic)
