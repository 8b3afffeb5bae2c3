"""``headrace feed``: serve this host's batch cache to trainers on other hosts over Arrow Flight.

Topology (DESIGN.md "Scale"): each ingest host runs ``serve --no-train`` (or ``backfill``)
into its own cache and ``feed`` beside it; trainers list every feed in ``[trainer] feeds``
and read them merged (``trainer.feed_reader``). The feed only reads the cache, so it may
start before ingest and be restarted at any time: readers resume from their cursor.

Example::

    headrace serve -c C --no-train &
    HEADRACE_FEED_TOKEN=s3cret headrace feed -c C --listen 0.0.0.0:8815 --token-env HEADRACE_FEED_TOKEN

Loopback (``127.0.0.1:8815``) is the default; port 0 picks a free port. The address is
reported through ``on_ready`` (the CLI prints it) as soon as the server listens.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable

import pyarrow as pa

from engine.config import HeadraceConfig
from engine.config.metrics import parse_listen
from engine.errors import ConfigError
from engine.processes import install_stop_signals

__all__ = ["feed", "DEFAULT_LISTEN"]

#: Arrow Flight's customary port, on loopback: exposing a cache is a decision.
DEFAULT_LISTEN = "127.0.0.1:8815"


def feed(cfg: HeadraceConfig, *, listen: str = DEFAULT_LISTEN, token_env: str | None = None,
         tls_cert: str | None = None, tls_key: str | None = None,
         on_ready: Callable[[dict[str, Any]], None] | None = None,
         stop: threading.Event | None = None, handle_signals: bool = True,
         shutdown_grace_s: float = 10.0) -> dict[str, Any]:
    """Serve ``cfg.cache`` until SIGINT/SIGTERM (with ``handle_signals``) or ``stop`` is set;
    returns ``{"feed", "cache", "streams", "batches", "rows", "bytes", "abandoned_streams"}``.
    ``on_ready({"feed": url, "cache": path})`` is called once the server listens.

    ``abandoned_streams`` is True when a reader that stopped reading kept its stream open
    ``shutdown_grace_s`` after the stop: the server is then still shutting down and the
    process must end with ``os._exit`` (a normal interpreter exit would wait for it).

    ``token_env``: the environment variable holding the bearer token every call must carry.
    ``tls_cert`` / ``tls_key``: PEM files; the feed then speaks ``grpc+tls``."""
    from engine.feed_server import FeedService
    from storage.batch_cache import BatchCache

    location = _location(listen, tls=bool(tls_cert or tls_key))
    token = _token(token_env)
    certs = _tls_certificates(tls_cert, tls_key)
    stop = stop or threading.Event()
    if handle_signals and threading.current_thread() is threading.main_thread():
        install_stop_signals(stop.set)
    # Writable: remote readers register their positions for retention (a tiny write); the
    # cache may not exist yet when the feed starts before ingest.
    with BatchCache.from_config(cfg.cache) as cache:
        try:
            server = FeedService(_url(location, location[2]), cache, token=token, tls_certificates=certs)
        except (pa.ArrowException, OSError) as exc:  # gRPC says only "did not start properly"
            raise ConfigError(f"feed --listen {listen!r}: cannot listen there ({exc}): is the port taken, or "
                              "the address not one of this host's? Pick a free port (0 = any)") from None
        url = _url(location, server.port)
        ready = {"feed": url, "cache": cache.path}
        sys.stderr.write(f"headrace feed: serving {cache.path} on {url}{' (token required)' if token else ''}\n")
        sys.stderr.flush()
        if on_ready is not None:
            on_ready(ready)
        try:
            stop.wait()
        finally:
            stopped = _stop_within(server, shutdown_grace_s)
            counts = server.counts()
    return {**ready, **counts, "abandoned_streams": not stopped}


def _stop_within(server, grace_s: float) -> bool:
    """Stop ``server``; False when a stream is still open after ``grace_s``. Every stream ends
    within a poll interval once its reader reads on, but gRPC blocks a write to a reader
    that stopped reading (a paused or hung trainer), and Flight's shutdown waits for it."""
    closer = threading.Thread(target=server.stop, name="feed-shutdown", daemon=True)
    closer.start()
    closer.join(grace_s)
    if closer.is_alive():
        sys.stderr.write(f"headrace feed: a reader stopped reading and its stream is still open after {grace_s:.0f}s; "
                         "exiting without waiting for it\n")
        return False
    return True


def _location(listen: str, *, tls: bool) -> tuple[str, str, int]:
    try:
        address = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(f"feed --listen: {exc}") from None
    if address is None:
        raise ConfigError("feed --listen: give HOST:PORT (port 0 = any free port); a feed cannot be off")
    host, port = address
    return ("grpc+tls" if tls else "grpc", host, port)


def _url(location: tuple[str, str, int], port: int) -> str:
    scheme, host, _ = location
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _token(token_env: str | None) -> str | None:
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ConfigError(f"feed --token-env {token_env}: that environment variable is unset or empty; "
                          "export the token in it (trainers send it from [trainer] feed_token_env)")
    return token


def _tls_certificates(cert: str | None, key: str | None) -> list[tuple[bytes, bytes]] | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("feed: TLS needs both --tls-cert and --tls-key (PEM files)")
    pems = []
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb") as fh:
                pems.append(fh.read())
        except OSError as exc:
            raise ConfigError(f"feed {flag} {path!r}: cannot read it ({exc.strerror})") from None
    return [(pems[0], pems[1])]
