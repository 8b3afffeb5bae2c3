"""Background prefetch for the row cache: one worker thread that reads the next batch's
missing rows from the row store while the current step computes.

``RowPrefetcher`` runs one job at a time; ``take()`` blocks until the job is done and hands
back its result exactly once (errors are re-raised there, in the caller's thread), so a
failed read is never silently skipped. Race freedom is the caller's contract (see
``trainer.cached_embedding``): the job only reads rows that are not cached, and the cache
only writes rows back after ``take()``.

``lookahead`` pairs each item of an iterable with the next one, so a loop can hand the
next batch to ``CachedEmbeddingBagCollection.prefetch`` while it trains on the current one.

Example:
    >>> list(lookahead([1, 2, 3]))
    [(1, 2), (2, 3), (3, None)]
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

__all__ = ["RowPrefetcher", "lookahead"]

T = TypeVar("T")


class RowPrefetcher:
    """A single background worker; at most one outstanding job."""

    def __init__(self, name: str = "headrace-row-prefetch"):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._future: concurrent.futures.Future | None = None
        self.wait_s = 0.0  # total time ``take`` blocked on an unfinished job

    @property
    def pending(self) -> bool:
        return self._future is not None

    def submit(self, fn: Callable[[], Any]) -> None:
        """Start ``fn`` in the worker. The previous job must have been taken or discarded."""
        if self._future is not None:
            raise RuntimeError("a prefetch is already pending; take() or discard() it first")
        self._future = self._pool.submit(fn)

    def take(self) -> Any:
        """The pending job's result (None when nothing is pending). Blocks until it is done."""
        future, self._future = self._future, None
        if future is None:
            return None
        start = time.perf_counter()
        try:
            return future.result()
        finally:
            self.wait_s += time.perf_counter() - start

    def discard(self) -> None:
        """Wait for the pending job and drop its result (errors included: nothing uses it)."""
        future, self._future = self._future, None
        if future is not None:
            concurrent.futures.wait([future])

    def close(self) -> None:
        self.discard()
        self._pool.shutdown(wait=True)


def lookahead(items: Iterable[T]) -> Iterator[tuple[T, T | None]]:
    """Yield ``(item, next_item)``; the last item comes with None. Pulls one item ahead."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for upcoming in it:
        yield current, upcoming
        current = upcoming
    yield current, None
