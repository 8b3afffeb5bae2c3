"""The Arrow Flight service behind ``headrace feed``: a batch cache's batches, in seq order,
to trainers on other hosts (the wire format is ``storage.feed_wire``).

Each ``DoGet`` runs in its own gRPC thread and reads the cache through
``BatchCache.iter_batches``: one short read transaction per batch, so a slow or stalled
reader never pins the cache's pages. Every stored batch is copied out of LMDB exactly once
(``zero_copy=False``): its stored Arrow IPC bytes are decoded without a copy, and Flight
hands the record batch's buffers to gRPC without a copy either, but gRPC keeps those
buffers until the bytes are on the wire, after ``DoGet`` moved on; buffers pointing into
LMDB's map would by then belong to a closed read transaction (pages the writer reuses).
That one copy is the same one the local trainer makes, and the reader decodes the
received messages without copying.

Authentication (``token``): every call must carry ``authorization: Bearer <token>``,
checked by a server middleware before the call runs; a missing or wrong token fails the
call with ``FlightUnauthenticatedError``. TLS: ``tls_certificates`` (PEM certificate chain
and key) with a ``grpc+tls://`` location.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.flight as flight

from storage.batch_cache import BatchCache
from storage.errors import CacheError
from storage.feed_wire import (
    FEED_PROTOCOL_VERSION, HEARTBEAT, FeedAction, FeedTicket, encode_batch_meta, heartbeat_batch,
)

__all__ = ["FeedService", "BearerTokenCheck", "REMOTE_READER_PREFIX"]

log = logging.getLogger(__name__)

#: A remote reader's retention position is registered in the cache under this prefix + its
#: name, apart from a trainer reading the cache locally.
REMOTE_READER_PREFIX = "feed:"


class BearerTokenCheck(flight.ServerMiddlewareFactory):
    """Rejects every call whose ``authorization`` header is not ``Bearer <token>``."""

    def __init__(self, token: str):
        super().__init__()
        self._expected = f"Bearer {token}".encode()

    def start_call(self, info, headers):
        given = headers.get("authorization") or []
        if not given or not hmac.compare_digest(str(given[0]).encode(), self._expected):
            raise flight.FlightUnauthenticatedError(
                "headrace feed: missing or wrong bearer token (the trainer's [trainer] feed_token_env "
                "must name a variable holding the token this feed's --token-env names)")
        return None


class FeedService(flight.FlightServerBase):
    """Serves ``cache`` at ``location`` (``grpc://host:port``, port 0 = any free port; see
    ``port``). It listens as soon as it is constructed; ``stop()`` ends every stream and
    shuts it down. ``poll_interval_s`` bounds how late a follow stream sees a new batch."""

    def __init__(self, location: str, cache: BatchCache, *, token: str | None = None,
                 tls_certificates: list[tuple[bytes, bytes]] | None = None, poll_interval_s: float = 0.02):
        middleware = {"auth": BearerTokenCheck(token)} if token else None
        super().__init__(location, tls_certificates=tls_certificates, middleware=middleware)
        self._cache = cache
        self._poll_s = poll_interval_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"streams": 0, "batches": 0, "rows": 0, "bytes": 0}

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """End every stream (each within a poll interval) and shut the server down."""
        self._stopping.set()
        self.shutdown()

    def counts(self) -> dict[str, int]:
        """Streams opened and batches, rows and stored bytes sent since start."""
        with self._lock:
            return dict(self._counts)

    def _count(self, **delta: int) -> None:
        with self._lock:
            for key, value in delta.items():
                self._counts[key] += value

    # ------------------------------------------------------------------ streams

    def do_get(self, context, ticket):
        try:
            t = FeedTicket.decode(ticket.ticket)
        except CacheError as exc:
            raise flight.FlightServerError(f"headrace feed: bad ticket: {exc}") from None
        with _as_flight_errors():
            schema = self._stream_schema(t.start_seq)
        self._count(streams=1)
        log.info("feed: stream from seq %d%s for %s", t.start_seq,
                 " (following)" if t.follow else f" to {t.end_seq if t.end_seq is not None else 'the end'}",
                 context.peer())
        return flight.GeneratorStream(schema, self._batches(t, schema, context))

    def _stream_schema(self, start_seq: int) -> pa.Schema:
        """The schema of the first batch at or after ``start_seq``; else of the last stored
        batch (a caught-up reader most likely gets that one next); else an empty schema."""
        with self._cache.reader() as r:
            cb = r.read_at_or_after(start_seq, copy=False)
            if cb is None:
                last = r.last_seq()
                cb = None if last is None else r.read_at_or_after(last, copy=False)
            # A schema owns its memory: it stays valid after the read transaction.
            return pa.schema([]) if cb is None else cb.batch.schema

    def _batches(self, t: FeedTicket, schema: pa.Schema, context) -> Iterator[Any]:
        with _as_flight_errors():
            yield from self._stream(t, schema, context)

    def _stream(self, t: FeedTicket, schema: pa.Schema, context) -> Iterator[Any]:
        heartbeat = (heartbeat_batch(schema), HEARTBEAT)
        seq = t.start_seq

        def gone() -> bool:
            return self._stopping.is_set() or context.is_cancelled()

        while not gone():
            batches = self._cache.iter_batches(
                seq, follow=t.follow, stop=gone, poll_interval_s=self._poll_s,
                max_wait_s=t.heartbeat_ms / 1000 if t.follow else None)
            for cb in batches:
                if t.end_seq is not None and cb.seq > t.end_seq:
                    return
                if not cb.batch.schema.equals(schema, check_metadata=True):
                    return  # the reader reopens at cb.seq and gets a stream of the new schema
                self._count(batches=1, rows=cb.num_rows, bytes=cb.nbytes)
                yield cb.batch, encode_batch_meta(cb)
                seq = cb.seq + 1
            if not t.follow:
                return
            if not gone():
                yield heartbeat

    # ------------------------------------------------------------------ actions

    def list_actions(self, context):
        return [(FeedAction.STATUS.value, "first and last cached seq, protocol version"),
                (FeedAction.READER_POSITION.value, "register a remote reader's position for retention")]

    def do_action(self, context, action):
        kind = action.type
        if kind == FeedAction.STATUS.value:
            yield orjson.dumps({"protocol": FEED_PROTOCOL_VERSION, "first_seq": self._cache.first_seq(),
                                "last_seq": self._cache.last_seq(), "cache": self._cache.path})
        elif kind == FeedAction.READER_POSITION.value:
            name, seq = _reader_position(action.body.to_pybytes())
            with _as_flight_errors():
                self._cache.set_reader_position(REMOTE_READER_PREFIX + name, seq)
            yield b"{}"
        else:
            raise flight.FlightServerError(
                f"headrace feed: unknown action {kind!r}; known: {[a.value for a in FeedAction]}")


@contextlib.contextmanager
def _as_flight_errors() -> Iterator[None]:
    """A cache error as the Flight error a reader understands: a retriable one (the map
    being grown, a cache not initialised yet) as unavailable, so the reader retries; any
    other as a server error, so it stops with the message."""
    try:
        yield
    except CacheError as exc:
        kind = flight.FlightUnavailableError if exc.retriable else flight.FlightServerError
        raise kind(f"headrace feed: {exc}") from exc


def _reader_position(body: bytes) -> tuple[str, int]:
    try:
        doc = orjson.loads(body)
        name, seq = doc["name"], doc["seq"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise flight.FlightServerError(
            f"headrace feed: {FeedAction.READER_POSITION.value} expects a JSON object with name and seq, "
            f"got {body[:100]!r}") from None
    if not isinstance(name, str) or not name or isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise flight.FlightServerError(
            f"headrace feed: {FeedAction.READER_POSITION.value}: name must be a non-empty string and seq "
            f"an int >= 0, got {name!r}, {seq!r}")
    return name, seq
