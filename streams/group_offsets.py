"""Informational consumer-group commits: tell Kafka tooling how far the cache has got.

Positions live in the batch cache (``BatchCache.next_offsets()``); sources never resume
from these commits. Committing them anyway lets standard lag monitors (``kafka-consumer-
groups``, Burrow, Cruise Control) see ``source.group_id`` progress. Commits are
synchronous, carry no group generation (the group has no members: readers use manual
assignment), and are idempotent (committing the same offsets twice is harmless).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from streams.config import SourceConfig
from streams.kafka_backend import backend_for

__all__ = ["commit_group_offsets", "committed_group_offsets"]


def commit_group_offsets(cfg: SourceConfig, offsets: Mapping[tuple[str, int], int]) -> None:
    """Commit ``{(topic, partition): next offset}`` for ``cfg.group_id``; blocks.

    Raises ``SourceError`` (retriable) when the broker rejects or cannot be reached.
    """
    if not offsets:
        return
    backend_for(cfg.client).commit_group_offsets(cfg, offsets)


def committed_group_offsets(
    cfg: SourceConfig, partitions: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], int | None]:
    """``{(topic, partition): committed offset or None}`` for ``cfg.group_id``."""
    return backend_for(cfg.client).committed_group_offsets(cfg, list(partitions))
