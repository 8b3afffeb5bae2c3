"""Errors raised by ``trainer``: the model, embeddings, planner, loop and checkpoints.

Exit codes are decided by ``engine.errors``. ``CheckpointError`` is declared by ``storage``
(which owns checkpoint files) and re-exported here.
"""

from __future__ import annotations

from storage.errors import CheckpointError

__all__ = ["TrainerError", "TrainerConfigError", "PlanError", "CheckpointError", "FeedError"]


class TrainerError(Exception):
    """Training cannot proceed (shape mismatch, non-finite loss, bad device)."""

    retriable: bool = False


class TrainerConfigError(TrainerError):
    """A trainer, sharding or row-cache setting cannot be applied; the message names the key,
    the value and the fix."""


class PlanError(TrainerError):
    """No sharding plan fits; the message says by how much and what would make it fit."""


class FeedError(TrainerError):
    """Reading batches from an Arrow Flight feed (``[trainer] feeds``) failed: unreachable for
    longer than ``[trainer] feed_retry_s`` (retriable: the next run resumes from the last
    checkpoint's per-feed cursor), a rejected token, or a server that is not a headrace feed
    of this version (not retriable). The message names the feed and the fix."""

    def __init__(self, message: str, *, feed: str = "", retriable: bool = False):
        super().__init__(message)
        self.feed = feed
        self.retriable = retriable
