"""One Arrow Flight feed (``headrace feed`` on another host), read with retries that resume
from the last batch received.

``FeedClient.batches(start_seq, ...)`` yields the feed's cached batches (``CachedBatch``,
with the *feed's* seqs) from ``start_seq`` on. A broken or refused connection is retried
with a fresh channel and backoff (50 ms doubling to 1 s), each time with a ticket at the seq
after the last batch it yielded, so no batch is yielded twice or skipped; after
``retry_s`` without a batch it raises ``FeedError`` (retriable). A rejected token or a
server that does not speak the feed protocol raises at once (not retriable).

The received batches are zero-copy views of gRPC's receive buffers (they own a reference
to them): keep them as long as needed. The wire format is ``storage.feed_wire``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.flight as flight

from storage.cache_reader import CachedBatch
from storage.errors import CacheError
from storage.feed_wire import FEED_PROTOCOL_VERSION, FeedAction, FeedTicket, decode_batch_meta
from trainer.errors import FeedError

__all__ = ["FeedClient", "FeedStatus"]

log = logging.getLogger(__name__)

_BACKOFF_FIRST_S = 0.05
_ACTION_TIMEOUT_S = 10.0
_BACKOFF_MAX_S = 1.0
#: gRPC keepalive pings find a peer that vanished without closing the connection (a host
#: crash or a network partition) instead of waiting on a dead stream forever.
_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 10_000),
                    ("grpc.keepalive_permit_without_calls", 1)]


class FeedStatus:
    """A feed's answer to ``status``: the first and last cached seq (None when empty)."""

    def __init__(self, first_seq: int | None, last_seq: int | None):
        self.first_seq, self.last_seq = first_seq, last_seq

    def count_from(self, seq: int) -> int:
        """Stored batches with seq >= ``seq`` (retention only deletes the oldest, so the
        stored seqs are contiguous)."""
        if self.last_seq is None:
            return 0
        return max(0, self.last_seq - max(seq, self.first_seq) + 1)


class FeedClient:
    """Reads the feed at ``url`` (``grpc://host:port`` or ``grpc+tls://host:port``).

    ``token``: sent as ``authorization: Bearer <token>`` on every call. ``tls_root_certs``:
    PEM of the CA that signed a ``grpc+tls`` feed's certificate (None: the system's roots).
    ``retry_s``: how long an unreachable feed is retried before ``FeedError``.
    """

    def __init__(self, url: str, *, token: str | None = None, tls_root_certs: bytes | None = None,
                 retry_s: float = 60.0, token_env: str = ""):
        self.url = url
        self.retry_s = retry_s
        self._token_env = token_env
        self._tls_root_certs = tls_root_certs
        self._sends_token = bool(token)
        headers = [(b"authorization", b"Bearer " + token.encode())] if token else []
        self._options = flight.FlightCallOptions(headers=headers)
        # Actions are short: a host that does not answer must not stall a checkpoint for long.
        self._action_options = flight.FlightCallOptions(headers=headers, timeout=_ACTION_TIMEOUT_S)
        self._client: flight.FlightClient | None = None

    def _connect(self) -> flight.FlightClient:
        if self._client is None:
            self._client = flight.FlightClient(self.url, tls_root_certs=self._tls_root_certs,
                                               generic_options=_CHANNEL_OPTIONS)
        return self._client

    def _reconnect(self) -> None:
        # A fresh channel: gRPC's own reconnect backoff of a failed channel grows to minutes.
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def close(self) -> None:
        self._reconnect()

    # ------------------------------------------------------------------ errors and retries

    def _fatal(self, exc: Exception) -> FeedError | None:
        """The FeedError that ends reading at once, or None when ``exc`` is worth a retry."""
        if isinstance(exc, (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError)):
            sent = f"the token in ${self._token_env}" if self._token_env else ("a token" if self._sends_token
                                                                               else "no token")
            return FeedError(
                f"feed {self.url} rejected the trainer's token (it sent {sent}): set [trainer] feed_token_env "
                "to the variable holding the token the feed's --token-env names", feed=self.url)
        if isinstance(exc, (flight.FlightServerError, CacheError)) or (
                isinstance(exc, pa.ArrowException) and not isinstance(exc, flight.FlightError)):
            # The feed refused the request or failed on it: asking again would fail again.
            return FeedError(f"feed {self.url} answered with an error: {_first_line(exc)}", feed=self.url)
        return None  # unavailable, timed out, cancelled, internal (a broken connection): retry

    def _retry(self, exc: Exception, outage: "_Outage | None", what: str, stop: Callable[[], bool]) -> "_Outage":
        """Wait before the next attempt after ``exc`` (``outage``: the failures since the last
        success, None: this is the first). Raises FeedError when ``exc`` is fatal or the feed
        has been unreachable for ``retry_s``."""
        fatal = self._fatal(exc)
        if fatal is not None:
            raise fatal from exc
        if outage is None:
            log.warning("feed %s: %s failed (%s); retrying for up to %.0fs", self.url, what,
                        _first_line(exc), self.retry_s)
            outage = _Outage()
        elapsed = time.monotonic() - outage.since
        if elapsed >= self.retry_s:
            raise FeedError(
                f"feed {self.url} unreachable for {elapsed:.0f}s while {what} ({_first_line(exc)}); "
                f"is `headrace feed` running there and does [trainer] feeds name its --listen address? "
                "The next run resumes from the last checkpoint", feed=self.url, retriable=True) from exc
        self._reconnect()
        deadline = time.monotonic() + outage.next_wait_s()
        while time.monotonic() < deadline and not stop():
            time.sleep(0.01)
        return outage

    def _action(self, kind: FeedAction, body: dict[str, Any] | None = None, *,
                stop: Callable[[], bool] = lambda: False, retry: bool = True) -> dict[str, Any]:
        outage = None
        while True:
            try:
                results = list(self._connect().do_action(
                    flight.Action(kind.value, orjson.dumps(body or {})), self._action_options))
                return orjson.loads(results[0].body.to_pybytes()) if results else {}
            except (pa.ArrowException, OSError) as exc:
                if not retry:
                    raise self._fatal(exc) or FeedError(
                        f"feed {self.url}: {kind.value} failed ({_first_line(exc)})", feed=self.url,
                        retriable=True) from exc
                outage = self._retry(exc, outage, f"asking for {kind.value}", stop)

    # ------------------------------------------------------------------ calls

    def status(self, *, stop: Callable[[], bool] = lambda: False) -> FeedStatus:
        """The feed's first and last seq now (retried like a stream)."""
        doc = self._action(FeedAction.STATUS, stop=stop)
        if doc.get("protocol") != FEED_PROTOCOL_VERSION:
            raise FeedError(f"feed {self.url} speaks feed protocol {doc.get('protocol')!r}, this trainer "
                            f"{FEED_PROTOCOL_VERSION}: run the same headrace version on both hosts", feed=self.url)
        return FeedStatus(doc.get("first_seq"), doc.get("last_seq"))

    def set_reader_position(self, name: str, seq: int) -> None:
        """Register this reader's position in the feed's cache (retention keeps seqs >= it).
        One attempt: raises FeedError when the feed cannot be told now."""
        self._action(FeedAction.READER_POSITION, {"name": name, "seq": seq}, retry=False)

    def batches(self, start_seq: int, *, end_seq: int | None = None, follow: bool = False,
                stop: Callable[[], bool] = lambda: False, heartbeat_s: float = 0.2) -> Iterator[CachedBatch]:
        """The feed's batches with seq >= ``start_seq`` (and <= ``end_seq`` when given), in
        seq order. Bounded (``follow=False``): ends at the feed's end. Following: waits for
        new batches and ends only when ``stop()`` turns true (checked at least every
        ``heartbeat_s``)."""
        heartbeat_ms = max(1, int(heartbeat_s * 1000))
        next_seq = start_seq
        outage: _Outage | None = None
        while not stop():
            if end_seq is not None and next_seq > end_seq:
                return
            ticket = flight.Ticket(FeedTicket(next_seq, end_seq, follow, heartbeat_ms).encode())
            got = 0
            reader = None
            try:
                reader = self._connect().do_get(ticket, self._options)
                while True:
                    try:
                        chunk = reader.read_chunk()
                    except StopIteration:
                        break
                    cb = decode_batch_meta(chunk.app_metadata, chunk.data)
                    if cb is not None:
                        got += 1
                        outage = None
                        next_seq = cb.seq + 1
                        yield cb
                    if stop():
                        return
            except (pa.ArrowException, OSError, CacheError) as exc:
                outage = self._retry(exc, outage, f"streaming from seq {next_seq}", stop)
                continue
            finally:
                if reader is not None:
                    reader.cancel()
            if not follow and got == 0:
                return  # nothing at or after next_seq (up to end_seq): the end
            if follow and got == 0:
                # A stream ended by a stopping server or a new schema: reopen after a pause.
                time.sleep(min(heartbeat_s, 0.05))


class _Outage:
    """Failed attempts since the last success: when they began and the next backoff."""

    def __init__(self) -> None:
        self.since = time.monotonic()
        self._wait_s = _BACKOFF_FIRST_S

    def next_wait_s(self) -> float:
        wait_s, self._wait_s = self._wait_s, min(_BACKOFF_MAX_S, self._wait_s * 2)
        return wait_s


def _first_line(exc: Exception) -> str:
    """The error's own message: Flight appends ``. Detail: ...`` and gRPC debug context."""
    text = (str(exc).strip().splitlines() or [""])[0].split(". Detail: ")[0]
    return f"{type(exc).__name__}: {text}"
