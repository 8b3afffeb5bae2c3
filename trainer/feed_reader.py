"""Several Arrow Flight feeds (``[trainer] feeds``) read as one cache: a deterministic merge
with a cursor the checkpoint records per feed.

Merge order: round-robin by batch in the order the feeds are listed. The merged batch
``m`` is the next batch of feed ``turn``; then ``turn`` moves to the next feed. Every
merged batch gets a *merged seq* (0, 1, 2, ... from the first run of a checkpoint lineage)
in place of its feed's seq, so ``trainer.data`` cuts training batches and keeps its
``Cursor(seq, row)`` exactly as over a local cache, and every ``torchrun`` rank, reading the
same feeds from the same position, sees the same batches in the same order and takes its
slice of each.

- Following (``follow=True``): the merge waits for the feed whose turn it is, even when
  others have batches, because any other choice would depend on timing. A feed that
  stops receiving data therefore holds the merge back; give every feed a share of the
  traffic (each ingest host serves its own partitions).
- Bounded: each feed is read up to the last seq it had when the read began (on a
  ``torchrun`` job, the ends rank 0 saw, handed to every rank by ``fix_ends``); a feed
  that reaches its end drops out of the rotation and the others go on.

Resume: the merge state before merged batch ``m`` is a ``MergePosition`` (each feed's next
seq, whose turn it is, ``m``). The loop checkpoints ``checkpoint_state(cursor.seq)`` beside
its cursor; a new ``FeedReader`` started from it yields merged batch ``m`` first, from the
same feed batch, so the cursor's row offset stays valid and no row is trained twice or
skipped.

Example::

    reader = FeedReader(["grpc://host-a:8815", "grpc://host-b:8815"])
    for cb in reader.iter_batches(0):   # bounded: everything the feeds hold now
        print(cb.seq, cb.topic, cb.partition, cb.num_rows)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from storage.cache_reader import CachedBatch
from trainer.config import TrainerConfig
from trainer.errors import FeedError, TrainerConfigError, TrainerError
from trainer.feed_client import FeedClient, FeedStatus

__all__ = ["FeedReader", "MergePosition", "Agree"]

log = logging.getLogger(__name__)

#: ``agree(values) -> values``: the list rank 0 passed, on every rank (identity for one process).
Agree = Callable[[list[int]], list[int]]

#: Checkpointed positions kept for ``set_reader_position`` (a background checkpoint becomes
#: durable a few batches after it was taken).
_KEEP_CHECKPOINTED = 16


@dataclasses.dataclass(frozen=True)
class MergePosition:
    """The merge state before merged batch ``merged_seq``: feed ``turn`` supplies it, from
    its first batch with seq >= ``next_seqs[turn]``."""

    feeds: tuple[str, ...]
    next_seqs: tuple[int, ...]
    turn: int = 0
    merged_seq: int = 0

    @classmethod
    def start(cls, feeds: Sequence[str]) -> "MergePosition":
        return cls(tuple(feeds), (0,) * len(feeds))

    def to_dict(self) -> dict[str, Any]:
        return {"feeds": list(self.feeds), "next_seqs": list(self.next_seqs), "turn": self.turn,
                "merged_seq": self.merged_seq}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MergePosition":
        return cls(tuple(d["feeds"]), tuple(int(s) for s in d["next_seqs"]), int(d["turn"]), int(d["merged_seq"]))


class FeedReader:
    """The merged feeds, with the read side of ``BatchCache`` the trainer loop uses
    (``iter_batches``, ``last_seq``, ``set_reader_position``, ``close``) plus
    ``checkpoint_state``. ``position``: where to start (from a checkpoint), default the
    beginning of every feed. Thread-safe: the loop reads on a prefetch thread and
    checkpoints on its own."""

    def __init__(self, feeds: Sequence[str], *, position: MergePosition | None = None,
                 token: str | None = None, token_env: str = "", tls_root_certs: bytes | None = None,
                 retry_s: float = 60.0):
        if not feeds:
            raise TrainerConfigError("FeedReader needs at least one feed URL")
        self.feeds = tuple(feeds)
        position = position or MergePosition.start(self.feeds)
        if position.feeds != self.feeds:
            raise TrainerError(
                f"the checkpoint was written reading feeds {list(position.feeds)}, but [trainer] feeds is "
                f"{list(self.feeds)}: the per-feed cursor only resumes the same feeds in the same order; "
                "restore that list or start a new checkpoint_dir")
        self._clients = [FeedClient(url, token=token, token_env=token_env, tls_root_certs=tls_root_certs,
                                    retry_s=retry_s) for url in self.feeds]
        self._lock = threading.Lock()
        self._positions: dict[int, MergePosition] = {position.merged_seq: position}
        self._checkpointed: collections.OrderedDict[int, MergePosition] = collections.OrderedDict()
        self._ends: list[FeedStatus] | None = None

    @classmethod
    def for_trainer(cls, t: TrainerConfig, position: MergePosition | None) -> "FeedReader":
        """The reader ``[trainer] feeds`` and its token and TLS settings describe."""
        token = None
        if t.feed_token_env:
            token = os.environ.get(t.feed_token_env)
            if not token:
                raise TrainerConfigError(
                    f"[trainer] feed_token_env = {t.feed_token_env!r}, but that environment variable is "
                    "unset or empty: export the feeds' token in it, or set feed_token_env = \"\"")
        certs = None
        if t.feed_tls_root_certs:
            try:
                with open(t.feed_tls_root_certs, "rb") as fh:
                    certs = fh.read()
            except OSError as exc:
                raise TrainerConfigError(f"[trainer] feed_tls_root_certs = {t.feed_tls_root_certs!r}: "
                                         f"cannot read it ({exc.strerror})") from None
        return cls(t.feeds, position=position, token=token, token_env=t.feed_token_env,
                   tls_root_certs=certs, retry_s=t.feed_retry_s)

    def close(self) -> None:
        for client in self._clients:
            client.close()

    # ------------------------------------------------------------------ bounded ends

    def fix_ends(self, agree: Agree | None = None) -> None:
        """Fix where a bounded read of each feed ends: its first and last seq now, as rank 0
        saw them when ``agree`` hands rank 0's list to every rank (collective then)."""
        statuses = [client.status() for client in self._clients]
        flat = [v for s in statuses for v in (_or_minus_one(s.first_seq), _or_minus_one(s.last_seq))]
        if agree is not None:
            flat = agree(flat)
        self._ends = [FeedStatus(_or_none(flat[2 * i]), _or_none(flat[2 * i + 1])) for i in range(len(statuses))]

    def last_seq(self) -> int | None:
        """The merged seq of the last batch a bounded read from the start position yields
        (fixing the ends first if ``fix_ends`` was not called); None when it yields none."""
        if self._ends is None:
            self.fix_ends()
        start = self._start_position()
        total = sum(end.count_from(seq) for end, seq in zip(self._ends, start.next_seqs))
        return start.merged_seq + total - 1 if total else None

    def _start_position(self) -> MergePosition:
        with self._lock:
            return self._positions[min(self._positions)]

    # ------------------------------------------------------------------ reading

    def iter_batches(self, start_seq: int = 0, *, follow: bool = False, stop: Callable[[], bool] | None = None,
                     poll_interval_s: float = 0.05, zero_copy: bool = False) -> Iterator[CachedBatch]:
        """Merged batches from merged seq ``start_seq`` on (a seq this reader started at or
        already yielded), each owning its memory (``zero_copy`` is accepted for the cache's
        signature; received batches never point into anything that goes away). ``stop``:
        polled at least every ``poll_interval_s`` while waiting."""
        stop = stop or (lambda: False)
        with self._lock:
            pos = self._positions.get(start_seq)
        if pos is None:
            raise TrainerError(f"the feed reader has no merge position for merged seq {start_seq}; "
                               "it can only start where it started or at a batch it yielded")
        if not follow and self._ends is None:
            self.fix_ends()
        n = len(self.feeds)
        streams = [
            client.batches(pos.next_seqs[i], end_seq=None if follow else self._ends[i].last_seq,
                           follow=follow, stop=stop, heartbeat_s=poll_interval_s)
            for i, client in enumerate(self._clients)
        ]
        if not follow:
            # An empty feed ends at once (its end is None, which would mean "no end").
            live = [self._ends[i].count_from(pos.next_seqs[i]) > 0 for i in range(n)]
        else:
            live = [True] * n
        next_seqs, turn, merged = list(pos.next_seqs), pos.turn, pos.merged_seq
        try:
            while any(live):
                if not live[turn]:
                    turn = (turn + 1) % n
                    continue
                at = MergePosition(self.feeds, tuple(next_seqs), turn, merged)
                cb = next(streams[turn], None)
                if cb is None:
                    if follow:
                        return  # stopped
                    live[turn] = False
                    continue
                with self._lock:
                    self._positions[merged] = at
                next_seqs[turn] = cb.seq + 1
                turn = (turn + 1) % n
                merged += 1
                yield dataclasses.replace(cb, seq=merged - 1)
        finally:
            for s in streams:
                s.close()

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self, merged_seq: int) -> dict[str, Any]:
        """The merge position before merged batch ``merged_seq`` (the loop's cursor seq), as
        the checkpoint records it. Positions before it are dropped: the loop never goes back."""
        with self._lock:
            pos = self._positions.get(merged_seq)
            if pos is None:
                raise TrainerError(f"no merge position for merged seq {merged_seq}: the cursor is not at "
                                   "a batch this feed reader yielded")
            for seq in [s for s in self._positions if s < merged_seq]:
                del self._positions[seq]
            self._checkpointed[merged_seq] = pos
            while len(self._checkpointed) > _KEEP_CHECKPOINTED:
                self._checkpointed.popitem(last=False)
        return pos.to_dict()

    def set_reader_position(self, name: str, seq: int) -> None:
        """Register, on every feed's cache, the feed position of merged seq ``seq`` (a
        checkpointed cursor) so the feed hosts' retention keeps what a resume needs. A feed
        that cannot be told now is told at the next checkpoint (logged)."""
        with self._lock:
            pos = self._checkpointed.get(seq) or self._positions.get(seq)
        if pos is None:
            log.debug("feeds: no merge position for merged seq %d to register", seq)
            return
        for client, feed_seq in zip(self._clients, pos.next_seqs):
            try:
                client.set_reader_position(name, feed_seq)
            except FeedError as exc:
                log.warning("feed %s: could not register the reader position (%s); retention there may "
                            "delete batches this trainer has not read", client.url, exc)


def _or_minus_one(v: int | None) -> int:
    return -1 if v is None else v


def _or_none(v: int) -> int | None:
    return None if v < 0 else v
