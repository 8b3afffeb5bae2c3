"""Composition root of headrace: config, pipeline wiring, service and backfill runners,
plugins, the CLI and the one exception hierarchy (``engine.errors``).

Lower packages (``streams``, ``transforms``, ``storage``, ``trainer``) may import
``engine.errors`` and ``engine.config`` (both free of heavy dependencies); nothing else
from here.
"""

__all__ = [
    "errors",
    "config",
    "logs",
    "plugins",
    "pipeline",
    "cache_sink",
    "processes",
    "progress",
    "lag",
    "metrics",
    "health",
    "serve",
    "backfill",
    "train",
    "feed",
    "feed_server",
    "demo",
    "fit_hash",
    "refit_loop",
    "export",
    "serving",
    "score",
    "cli",
]
