"""Config section [metrics]: the Prometheus endpoint of ``serve``, ``backfill`` and ``train``.

Example:
    >>> MetricsConfig(listen="127.0.0.1:0").address
    ('127.0.0.1', 0)
    >>> MetricsConfig(listen="").address is None
    True
"""

from __future__ import annotations

import dataclasses

__all__ = ["MetricsConfig", "parse_listen"]


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``"host:port"`` (``"[::1]:9464"`` for IPv6) -> ``(host, port)``; ``""`` -> None (off).
    Raises ValueError naming what is wrong."""
    text = listen.strip()
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen {listen!r}: expected HOST:PORT like '127.0.0.1:9464' "
                         "(port 0 = any free port), or '' to turn the endpoint off")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"listen {listen!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"listen {listen!r}: port {port} is outside 0..65535")
    return host, port


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    # Where /metrics, /healthz and /readyz are served. Loopback by default: put a reverse
    # proxy or the Prometheus agent on the host to expose it. "" turns the endpoint off;
    # port 0 picks a free port (printed, and written to <cache.path>.<command>.metrics.json).
    listen: str = "127.0.0.1:9464"
    # /readyz fails while the consumer lag (all partitions) is above this many events.
    ready_max_lag: int = 100_000
    # /readyz fails when the trainer has not reported a step for this long while the cache
    # holds at least a batch it has not trained.
    ready_max_stall_s: float = 60.0
    # How often the pipeline child hands its counters to the supervisor.
    snapshot_every_s: float = 1.0

    def __post_init__(self):
        parse_listen(self.listen)
        if self.ready_max_lag < 0:
            raise ValueError(f"ready_max_lag must be >= 0, got {self.ready_max_lag}")
        if not self.ready_max_stall_s > 0:
            raise ValueError(f"ready_max_stall_s must be > 0, got {self.ready_max_stall_s}")
        if not self.snapshot_every_s > 0:
            raise ValueError(f"snapshot_every_s must be > 0, got {self.snapshot_every_s}")

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind, or None when the endpoint is off."""
        return parse_listen(self.listen)
