"""The embedding-collection interface every table placement implements, and the plain one.

A collection maps ``{feature: Jagged}`` to pooled embeddings ``[B, F, D]`` in the order of
``feature_names``. The plain ``EmbeddingBagCollection`` keeps every table in one process;
sharded (``trainer.sharding``) and SSD-cached (``trainer.cached_embedding``) collections
implement the same interface so the DLRM does not care where rows live.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from trainer.batch import Jagged

__all__ = ["TableSpec", "EmbeddingBagCollection", "shared_dim", "init_rows"]


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One embedding table: the feature it serves, its rows and dim."""

    name: str
    rows: int
    dim: int


class EmbeddingBagCollection(nn.Module):
    """One ``nn.EmbeddingBag`` (sum pooling) per feature, all in this process.

    Rows start from a deterministic uniform(-1/sqrt(rows)... ) init seeded per table so that
    sharded and cached collections can reproduce the same initial rows (see ``init_rows``).
    """

    def __init__(self, tables: list[TableSpec] | tuple[TableSpec, ...], seed: int = 0):
        super().__init__()
        shared_dim(tables)
        self.tables = tuple(tables)
        self.feature_names = tuple(t.name for t in tables)
        self.dim = tables[0].dim
        self.bags = nn.ModuleDict()
        for i, t in enumerate(tables):
            bag = nn.EmbeddingBag(t.rows, t.dim, mode="sum")
            with torch.no_grad():
                bag.weight.copy_(init_rows(t, torch.arange(t.rows), seed))
            self.bags[t.name] = bag

    def forward(self, sparse: dict[str, Jagged]) -> torch.Tensor:
        pooled = []
        for name in self.feature_names:
            j = sparse[name]
            pooled.append(
                self.bags[name](j.values, j.offsets[:-1], per_sample_weights=j.weights)
            )
        return torch.stack(pooled, dim=1)


def shared_dim(tables, error: type[Exception] = ValueError) -> int:
    """The one embedding dim of ``tables`` (the dot interaction needs one); ``error`` if
    there are no tables or their dims differ."""
    if not tables:
        raise error("an embedding collection needs at least one table")
    dims = {t.dim for t in tables}
    if len(dims) != 1:
        raise error(f"all tables must share one dim for the dot interaction, got {sorted(dims)}")
    return dims.pop()


def init_rows(table: TableSpec, rows: torch.Tensor, seed: int) -> torch.Tensor:
    """Deterministic initial values of the given rows of a table: uniform in
    [-1/sqrt(rows), 1/sqrt(rows)] from a counter-based hash of (seed, table, row, column).

    Any placement (plain, sharded, cached, lazily materialised on SSD) calls this, so a row
    has the same initial value wherever and whenever it is first created.
    """
    rows = rows.to(torch.int64)
    cols = torch.arange(table.dim, dtype=torch.int64)
    name_salt = _stable_str_hash(table.name)
    x = (rows[:, None] * table.dim + cols[None, :]) ^ (seed * 0x9E3779B1 + name_salt)
    # splitmix64-style mixing in int64 arithmetic (wrapping), then keep 24 bits
    x = x * -7046029254386353131
    x = x ^ (x >> 31)
    x = x * -4658895280553007687
    x = x ^ (x >> 29)
    u = (x & 0xFFFFFF).to(torch.float32) / float(0xFFFFFF)
    bound = 1.0 / max(table.rows, 1) ** 0.5
    return (u * 2.0 - 1.0) * bound


def _stable_str_hash(s: str) -> int:
    h = 1469598103934665603
    for b in s.encode():
        h = ((h ^ b) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h
