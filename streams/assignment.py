"""Static partition assignment: which pipeline process of which host reads a partition.

Two levels, both fixed by config, with no coordination between processes or hosts:

- ``[source] member = "i/n"``: host i of n takes the partitions p with ``p mod n == i``;
- ``[pipeline] workers = N``: within a host, worker w takes those with ``(p div n) mod N == w``.

With one host (``member = "0/1"``) partition p goes to worker ``p mod N``. A backfill from
files applies the same rule to each file's index in the (sorted) file list. Every partition
is read by exactly one process of one host, so each partition's offsets in a cache have one
writer and the cache's exactly-once rule (batch and offset in one transaction) holds
unchanged. Partitions are numbered per topic: partition 3 of every topic goes to the same
worker.

Example:
    >>> share = Share.for_member("1/2", worker=0, workers=2)
    >>> [p for p in range(8) if share.owns(p)]
    [1, 5]
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

__all__ = ["Share", "parse_member"]

T = TypeVar("T")


def parse_member(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; ValueError naming ``member`` unless ``0 <= i < n``."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError(f'member must be "i/n" (this host\'s index i of n hosts, e.g. "0/2"), got {text!r}')
    i, n = int(index), int(count)
    if n < 1 or i >= n:
        raise ValueError(f'member "{text}": need n >= 1 and 0 <= i < n (hosts are numbered 0 .. n-1)')
    return i, n


@dataclasses.dataclass(frozen=True)
class Share:
    """The partitions one pipeline process reads: member ``member`` of ``members`` hosts,
    worker ``worker`` of that host's ``workers`` processes."""

    member: int = 0
    members: int = 1
    worker: int = 0
    workers: int = 1

    def __post_init__(self):
        if not 0 <= self.member < self.members:
            raise ValueError(f"member {self.member} is not in 0 .. {self.members - 1}")
        if not 0 <= self.worker < self.workers:
            raise ValueError(f"worker {self.worker} is not in 0 .. {self.workers - 1}")

    @classmethod
    def for_member(cls, member: str, *, worker: int = 0, workers: int = 1) -> "Share":
        i, n = parse_member(member)
        return cls(i, n, worker, workers)

    def owns(self, partition: int) -> bool:
        return (partition % self.members == self.member
                and (partition // self.members) % self.workers == self.worker)

    def pick(self, items: Sequence[T]) -> list[T]:
        """The items whose index this share owns (a backfill's files)."""
        return [item for i, item in enumerate(items) if self.owns(i)]

    def worker_shares(self) -> list["Share"]:
        """Every worker's share of this share's host."""
        return [dataclasses.replace(self, worker=w) for w in range(self.workers)]

    def __str__(self) -> str:
        return f"worker {self.worker}/{self.workers} of member {self.member}/{self.members}"
