"""The first-order ("wide") part of every model kind: a learned weight per id of every sparse
feature plus a linear term on the dense features, added to the logit::

    first_order(x) = b + v . dense + sum_f sum_{id in bag f} w_f[row(id)]

(per-sample weights of a weighted bag multiply its ids' weights). Alone it is the
``linear`` model kind: online logistic regression on hashed one-hot features.

The per-id weights are **1-wide embedding rows**: one table per sparse feature with the
feature's own rows (``first_order_tables``), so the remapped id that indexes a feature's
embedding table indexes its first-order table too, and rows start at zero. They live in an
embedding collection of their own, built by the same factory as the main one, so they are
placed like it "by construction":

* plain: ``trainer.model.fused_embeddings_from_config(cfg, device, tables=first_order_tables(cfg))``;
* SSD row cache: ``trainer.cached_embedding.build_cached_embeddings(first_order_spec(cfg), ...)``,
  its row store in ``<row_cache.path>/first_order``;
* sharded: ``trainer.sharding.build_sharded_embeddings(first_order_spec(cfg),
  first_order_plan(plan), ctx, tables=first_order_tables(cfg))``: every table sharded as its
  embedding table is (the same ranks and row ranges; a column-wise table's 1-wide rows go
  whole to the rank of its first column block).

They train with ``[trainer] sparse_optimizer`` at ``[model] first_order_learning_rate``.
Under row-wise Adagrad a 1-wide row's accumulator is its own, i.e. per-coordinate Adagrad,
and with ``[model] first_order_accumulator = "per_lookup"`` (the default) it adds the squares
of the row's per-lookup gradients rather than the square of their batch sum: online logistic
regression's step sizes (``trainer.sparse_optim``), where the batch sum makes an id seen k
times in a batch step about sqrt(k) times too short. ``b`` and ``v`` are dense parameters
(zero at start) trained by the dense optimizer.

Example:
    >>> from transforms.config import SchemaConfig, SparseFeature
    >>> from trainer.config import TrainSpec
    >>> [(t.name, t.rows, t.dim) for t in first_order_tables(TrainSpec(SchemaConfig(sparse=(SparseFeature("u", rows=10),))))]
    [('u', 10, 1)]
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from trainer.batch import Jagged
from trainer.config import ShardingType, TrainSpec
from trainer.embedding import EmbeddingBagCollection, RowInit, TableSpec
from trainer.errors import TrainerError
from trainer.fused_embedding import FusedEmbeddingBagCollection
from trainer.planner import Plan

__all__ = ["FirstOrder", "first_order_tables", "first_order_spec", "first_order_plan",
           "first_order_like", "dense_param_groups", "FIRST_ORDER_STORE"]

#: Subdirectory of ``[row_cache] path`` holding the first-order tables' row store(s).
FIRST_ORDER_STORE = "first_order"


def first_order_tables(cfg: TrainSpec) -> list[TableSpec]:
    """One 1-wide, zero-initialised table per ``[[schema.sparse]]`` feature, in schema order,
    with the feature's rows."""
    return [TableSpec(s.name, s.rows, 1, RowInit.ZEROS) for s in cfg.schema.sparse]


def first_order_spec(cfg: TrainSpec):
    """``cfg`` as the placement factories should see it when they build the first-order
    tables: the row store under ``<row_cache.path>/first_order`` (beside, not inside, the
    embedding tables' stores), the first-order rate (``[model] first_order_learning_rate``,
    by default the kind's) as the sparse learning rate and ``first_order_accumulator`` as the
    sparse accumulator. Works on a ``TrainSpec`` and on any config tree with the same
    sections (dataclasses)."""
    rc = cfg.row_cache
    t = dataclasses.replace(cfg.trainer, sparse_accumulator=cfg.model.first_order_accumulator,
                            sparse_learning_rate=cfg.model.first_order_lr)
    return dataclasses.replace(
        cfg, row_cache=dataclasses.replace(rc, path=os.path.join(rc.path, FIRST_ORDER_STORE)), trainer=t)


def dense_param_groups(model: nn.Module, cfg: TrainSpec) -> list[dict]:
    """The dense optimizer's param groups: the model's parameters, and the first-order
    part's (``model.first_order``) in a second group at the first-order rate
    (``ModelConfig.first_order_lr``), so changing that rate keeps a checkpoint's optimizer state
    loadable, marked ``"warmup": False`` (``trainer.stability``: the first-order part, a
    convex model, trains at its full rate from the first step). One group for a model
    without the first-order part, as before it existed."""
    part = getattr(model, "first_order", None)
    if part is None:
        return [{"params": list(model.parameters())}]
    own = {id(p) for p in part.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in own]},
            {"params": [p for p in model.parameters() if id(p) in own],
             "lr": cfg.model.first_order_lr, "warmup": False}]


def first_order_plan(plan: Plan) -> Plan:
    """The sharding plan of the first-order tables, derived from the embedding tables' plan
    (a pure function, so every rank derives the same): each table keeps its sharding type,
    placement and shards with one column; a column-wise table, whose single column cannot be
    split, goes table-wise to the rank of its first column block. Cost estimates are the
    embedding tables' (informational only). The linear kind, which has no embedding tables,
    derives it from the plan its ``embedding_dim``-wide tables would get (so its memory
    checks are conservative)."""
    tables = []
    for tp in plan.tables:
        if tp.sharding is ShardingType.COLUMN_WISE:
            first = min(tp.shards, key=lambda s: s.col_start)
            shards = (dataclasses.replace(first, row_start=0, row_end=tp.rows, col_start=0, col_end=1),)
            tables.append(dataclasses.replace(tp, dim=1, sharding=ShardingType.TABLE_WISE, shards=shards))
        else:
            shards = tuple(dataclasses.replace(s, col_start=0, col_end=1) for s in tp.shards)
            tables.append(dataclasses.replace(tp, dim=1, shards=shards))
    return dataclasses.replace(plan, tables=tuple(tables))


def first_order_like(embeddings: nn.Module | None, cfg: TrainSpec) -> nn.Module:
    """The first-order collection a model builds when none is given: plain
    ``EmbeddingBagCollection`` rows (trained by the dense optimizer) beside plain ones or no
    collection, fused rows with the same sparse optimizer (at the first-order rate and
    accumulator), dtype and device beside a fused collection. Other placements (sharded,
    row-cached) are built by their factory with the collective or store they need: pass
    them as ``first_order=``."""
    tables = first_order_tables(cfg)
    if embeddings is None or isinstance(embeddings, EmbeddingBagCollection):
        return EmbeddingBagCollection(tables, seed=cfg.trainer.seed)
    if isinstance(embeddings, FusedEmbeddingBagCollection):
        optimizer = dataclasses.replace(embeddings.optimizer, accumulator=cfg.model.first_order_accumulator,
                                        learning_rate=cfg.model.first_order_lr)
        return FusedEmbeddingBagCollection(tables, cfg.trainer.seed, optimizer=optimizer,
                                           embedding_dtype=embeddings.weights.dtype,
                                           device=embeddings.weights.device)
    raise TrainerError(
        f"[model] wide = true needs the first-order tables placed like the embeddings, and a "
        f"{type(embeddings).__name__} cannot be copied here: build them with the same factory "
        "(see trainer.first_order) and pass them as first_order=, or set [model] wide = false")


class FirstOrder(nn.Module):
    """``forward(dense [B, num_dense], sparse) -> [B]``: the first-order logit (module
    docstring). ``embeddings``: a collection of 1-wide rows serving the sparse features
    (None: no sparse features)."""

    def __init__(self, num_dense: int, embeddings: nn.Module | None):
        super().__init__()
        self.num_dense = num_dense
        self.embeddings = embeddings
        self.feature_names: tuple[str, ...] = tuple(embeddings.feature_names) if embeddings is not None else ()
        if num_dense == 0 and embeddings is None:
            raise TrainerError("the first-order part needs dense features, sparse features or both")
        self.bias = nn.Parameter(torch.zeros(1))
        self.dense = nn.Linear(num_dense, 1, bias=False) if num_dense else None
        if self.dense is not None:
            with torch.no_grad():
                self.dense.weight.zero_()

    def forward(self, dense: torch.Tensor, sparse: dict[str, Jagged]) -> torch.Tensor:
        if self.embeddings is not None:
            out = self.embeddings(sparse).sum(dim=(1, 2))
        else:
            out = torch.zeros(dense.shape[0], device=self.bias.device)
        if self.dense is not None:
            out = out + self.dense(dense).squeeze(1)
        return out + self.bias
