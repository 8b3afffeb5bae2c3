"""Composition root of headrace: config, pipeline wiring, service and backfill runners,
plugins, the CLI and the one exception hierarchy (``engine.errors``).

Lower packages (``streams``, ``transforms``, ``storage``, ``trainer``) may import
``engine.errors`` and ``engine.config`` (both dependency-free); nothing else here.
"""

__all__ = ["errors", "config"]
