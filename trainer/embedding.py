"""The embedding-collection interface every table placement implements, and the plain one.

A collection maps ``{feature: Jagged}`` to pooled embeddings ``[B, F, D]`` in the order of
``feature_names`` (``EmbeddingCollection``). The plain ``EmbeddingBagCollection`` keeps
every table in one process; fused (``trainer.fused_embedding``), sharded
(``trainer.sharding``) and SSD-cached (``trainer.cached_embedding``) collections implement
the same interface so the DLRM does not care where rows live.

What a collection does besides ``forward`` it declares in ``capabilities``
(``CollectionCapabilities``); the loop and the checkpoints read that declaration
(``capabilities_of``) instead of probing for methods:

* ``sparse_step``: it updates its own rows; ``sparse_step()`` is called after ``backward()``.
* ``prefetch``: ``prefetch(next_sparse)`` right after the forward pass lets the next batch's
  rows or ids travel while this step computes.
* ``flush``: ``flush()`` before a checkpoint writes what it holds back to its store.
* ``own_checkpoint_state``: its rows are not in ``state_dict()``; a checkpoint stores
  ``checkpoint_state()`` and restores it with ``load_checkpoint_state(state)``.
* ``lr_scale``: ``set_lr_scale(f)`` makes its sparse optimizer use ``f`` times its learning
  rate from the next ``sparse_step()`` on (learning-rate warmup, ``trainer.stability``).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from trainer.batch import Jagged
from transforms.config import SchemaConfig

__all__ = [
    "TableSpec", "CollectionCapabilities", "EmbeddingCollection", "capabilities_of",
    "EmbeddingBagCollection", "table_specs", "shared_dim", "init_rows", "RowInit", "collections_of",
]


@dataclasses.dataclass(frozen=True)
class CollectionCapabilities:
    """What an embedding collection does besides ``forward`` (see the module docstring)."""

    sparse_step: bool = False
    prefetch: bool = False
    flush: bool = False
    own_checkpoint_state: bool = False
    lr_scale: bool = False


@runtime_checkable
class EmbeddingCollection(Protocol):
    """The interface of every embedding collection (an ``nn.Module``)."""

    feature_names: tuple[str, ...]
    dim: int
    capabilities: CollectionCapabilities

    def forward(self, sparse: dict[str, Jagged]) -> torch.Tensor: ...


_NONE = CollectionCapabilities()


def capabilities_of(collection: object) -> CollectionCapabilities:
    """The capabilities ``collection`` declares; none for a collection that declares none
    (e.g. a user's own module) or for no collection at all."""
    return getattr(collection, "capabilities", _NONE)


def collections_of(model: nn.Module) -> dict[str, nn.Module]:
    """Every embedding collection of a model, by its attribute path (the prefix of its keys in
    ``model.state_dict()``, without the dot): what ``model.embedding_collections()`` declares
    (the trainer's models: ``embeddings`` and ``first_order.embeddings``), else
    ``{"embeddings": model.embeddings}`` for any other module with one collection."""
    declared = getattr(model, "embedding_collections", None)
    if declared is not None:
        return dict(declared())
    emb = getattr(model, "embeddings", None)
    return {} if emb is None else {"embeddings": emb}


class RowInit(enum.Enum):
    """How a table's rows start (``init_rows``)."""

    UNIFORM = "uniform"  # uniform in [-1/sqrt(rows), 1/sqrt(rows)], hashed per element
    ZEROS = "zeros"  # all zero: first-order weights start as logistic regression's do


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One embedding table: the feature it serves, its rows and dim, and how its rows start."""

    name: str
    rows: int
    dim: int
    init: RowInit = RowInit.UNIFORM


def table_specs(schema: SchemaConfig, embedding_dim: int) -> list[TableSpec]:
    """One ``TableSpec`` per ``[[schema.sparse]]`` feature, in schema order; a feature's
    ``dim = 0`` means ``trainer.embedding_dim`` (the one place that default is applied)."""
    return [TableSpec(s.name, s.rows, s.dim or embedding_dim) for s in schema.sparse]


class EmbeddingBagCollection(nn.Module):
    """One ``nn.EmbeddingBag`` (sum pooling) per feature, all in this process.

    Rows start from a deterministic uniform(-1/sqrt(rows)... ) init seeded per table so that
    sharded and cached collections can reproduce the same initial rows (see ``init_rows``).
    """

    capabilities = CollectionCapabilities()

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
    has the same initial value wherever and whenever it is first created. The result lies on
    ``rows``' device and is bitwise the same on every device (integer hashing, then exact or
    correctly rounded fp32 ops; tests/trainer checks CUDA against the CPU), so large tables
    can be initialised on the GPU. A ``RowInit.ZEROS`` table's rows are all zero.
    """
    if table.init is RowInit.ZEROS:
        return torch.zeros(rows.numel(), table.dim, device=rows.device)
    rows = rows.to(torch.int64)
    cols = torch.arange(table.dim, dtype=torch.int64, device=rows.device)
    name_salt = _stable_str_hash(table.name)
    x = (rows[:, None] * table.dim + cols[None, :]) ^ (seed * 0x9E3779B1 + name_salt)
    # splitmix64-style mixing in int64 arithmetic (wrapping), then keep 24 bits
    x = x * -7046029254386353131
    x = x ^ (x >> 31)
    x = x * -4658895280553007687
    x = x ^ (x >> 29)
    # A 0-dim tensor divisor on rows' device: CUDA divides by a host scalar as a multiply by
    # its reciprocal (not correctly rounded); by a device tensor it divides as the CPU does.
    u = (x & 0xFFFFFF).to(torch.float32) / torch.tensor(float(0xFFFFFF), device=rows.device)
    bound = 1.0 / max(table.rows, 1) ** 0.5
    return (u * 2.0 - 1.0) * bound


def _stable_str_hash(s: str) -> int:
    h = 1469598103934665603
    for b in s.encode():
        h = ((h ^ b) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h
