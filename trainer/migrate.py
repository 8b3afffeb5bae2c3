"""Embedding-row migration at an id-mapping version boundary.

When the trainer reaches the first batch of a new mapping version, the rows of every
sparse feature's table are rebuilt for the new mapping so that what the model knows about
each id survives the change:

* An id's *old value* is what the old mapping gave it: the sum of its rows (one row, or
  two for a two-lookup mapper such as ``double``).
* Each new row becomes the **access-weighted mean** of the old values of its member ids
  (the ids the new mapping sends to it), divided by the new mapping's lookups so that a
  two-lookup id's summed rows again equal the mean. Weights are the ids' access counts.
* Optimizer state rows (row-wise Adagrad's one accumulator per row, Adagrad's ``sum``,
  Adam's ``exp_avg`` / ``exp_avg_sq``, SGD momentum) become the access-weighted mean of the
  *mean* of the old state rows of the member ids (state is per row, not summed by the bag).
* Rows no known id maps to (the reserved range for unseen ids, hashed ranges of unseen
  ids) get the access-weighted mean over all known ids (a "typical id"), divided by the new
  lookups for weights.

Only ids in the statistics move; everything is done in place (same table shapes: a
mapping version never changes a table's row count), in chunks of ``chunk_ids`` ids.
Deterministic for fixed inputs: the statistics are those the new version was fitted on
(``storage.migration_stats``), so a run resumed from a checkpoint taken before the boundary
migrates to the same rows.

Where the rows live decides how they move (``migrate_model``), for every embedding collection
of the model (``embedding_collections``: the ``embedding_dim``-wide tables and the first-order
part's 1-wide ones alike); the arithmetic is ``trainer.migrate_rows`` for all of them:

* in memory (plain ``nn.EmbeddingBag``s with their torch optimizer state, fused tables with
  their row-wise state, replicated tables): rewritten in place (``migrate_table``);
* sharded across ranks (``trainer.migrate_sharded``): each rank's shards send partial sums
  of the new rows to the shards those rows belong to, in one all-to-all;
* on SSD behind the row cache (``trainer.migrate_row_cache``): rewritten in the row store
  through its undo log, the cache emptied first; a crash rolls the migration back with the
  uncommitted epoch and the resumed trainer migrates again.

``model_tables`` gives the in-memory tables of a live model; ``checkpoint_tables`` those of
the newest checkpoint, for a learned fit's id vectors. Both are decided here, next to the
migration that rewrites them, so callers never name state-dict keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.cached_embedding import CachedEmbeddingBagCollection
from trainer.checkpoint import latest_checkpoint
from trainer.config import TrainSpec
from trainer.embedding import EmbeddingBagCollection, collections_of
from trainer.errors import TrainerError
from trainer.fused_embedding import FusedEmbeddingBagCollection
from trainer.migrate_row_cache import migrate_row_cache
from trainer.migrate_rows import MapperLike, MigrationInputs, TensorBlock, migrate_block
from trainer.migrate_sharded import migrate_sharded
from trainer.sharded_embedding import ShardedEmbeddingCollection

__all__ = ["MapperLike", "migrate_table", "migrate_model", "model_tables", "checkpoint_tables",
           "embedding_collections"]

#: Collections whose rows ``migrate_model`` knows how to reach (it does not look inside them).
_MIGRATABLE = (FusedEmbeddingBagCollection, EmbeddingBagCollection, ShardedEmbeddingCollection,
               CachedEmbeddingBagCollection)


@torch.no_grad()
def migrate_table(weight: torch.Tensor, states: list[torch.Tensor], old: MapperLike, new: MapperLike,
                  ids: np.ndarray, counts: np.ndarray, *, chunk_ids: int = 1 << 20) -> None:
    """Rewrite ``weight`` [rows, dim] and each tensor in ``states`` ([rows] or [rows, k]: one
    state row per table row) in place for the change ``old`` -> ``new`` mapping, using ids
    with access ``counts`` (see module docstring). ``weight``'s rows must equal both mappers'
    rows."""
    _check_shapes(weight, states, old, new)
    migrate_block(TensorBlock([weight] + list(states)),
                   MigrationInputs.from_stats(old, new, ids, counts, chunk_ids))


def _check_shapes(weight: torch.Tensor, states: list[torch.Tensor], old: MapperLike, new: MapperLike) -> None:
    if weight.dim() != 2 or weight.shape[0] != old.rows or old.rows != new.rows:
        raise TrainerError(
            f"row migration: table shape {tuple(weight.shape)} must be [rows, dim] with rows equal to "
            f"the old ({old.rows}) and new ({new.rows}) mappings' rows"
        )
    for s in states:
        if s.dim() not in (1, 2) or s.shape[0] != weight.shape[0]:
            raise TrainerError(f"row migration: optimizer state {tuple(s.shape)} has not one row per "
                               f"table row ({weight.shape[0]})")


def model_tables(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                 ) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    """``{feature: (table rows [rows, dim], [optimizer state with one row per table row])}``
    of ``model.embeddings``, as tensors that write through to the model: the fused
    collection's views into its buffer and state, or a plain collection's ``nn.EmbeddingBag``
    weights and the state ``optimizer`` keeps for them. Sharded and SSD-cached collections
    have no such whole-table tensors (``migrate_model`` migrates them where their rows are)."""
    return _in_memory_tables(getattr(model, "embeddings", model), optimizer)  # a DLRM, or a collection


def _in_memory_tables(emb: nn.Module, optimizer: torch.optim.Optimizer | None
                      ) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    if isinstance(emb, FusedEmbeddingBagCollection):
        out = {}
        for t, start in zip(emb.tables, emb.table_starts):
            states = [s[start:start + t.rows] for s in emb.optimizer_state().values()]
            out[t.name] = (emb.weights[start:start + t.rows], states)
        return out
    if isinstance(emb, EmbeddingBagCollection):
        out = {}
        for name in emb.feature_names:
            weight = emb.bags[name].weight
            st = optimizer.state.get(weight, {}) if optimizer is not None else {}
            out[name] = (weight.data, [v for v in st.values() if torch.is_tensor(v) and v.shape == weight.shape])
        return out
    raise TrainerError(
        f"{type(emb).__name__} keeps no whole tables in memory (sharded or SSD-cached); "
        "trainer.migrate.migrate_model migrates its rows where they are"
    )


def embedding_collections(model: nn.Module) -> list[nn.Module]:
    """Every embedding collection of ``model`` (``trainer.embedding.collections_of``: the
    ``embedding_dim``-wide rows and the first-order part's 1-wide rows), or ``model`` itself
    when it is a collection."""
    if isinstance(model, _MIGRATABLE):
        return [model]
    return list(collections_of(model).values())


def _checkpoint_table_rows(state: Mapping[str, Any], spec: TrainSpec) -> dict[str, torch.Tensor]:
    """Per-feature table rows in a checkpoint's model state: the fused buffer
    (``embeddings.weights``, split by the tables its extra state lists) or per-feature bags."""
    fused = state.get("embeddings.weights")
    extra = state.get("embeddings._extra_state")
    if fused is not None and isinstance(extra, dict):
        out, start = {}, 0
        for name, rows, _dim in extra["tables"]:
            out[name] = fused[start:start + rows]
            start += rows
        return out
    return {s.name: state[f"embeddings.bags.{s.name}.weight"] for s in spec.schema.sparse
            if f"embeddings.bags.{s.name}.weight" in state}


def checkpoint_tables(spec: TrainSpec) -> tuple[dict[str, np.ndarray], int | None]:
    """Embedding tables ``{feature: float32 [rows, dim]}`` of the newest checkpoint in
    ``spec.trainer.checkpoint_dir`` and the mapping version they were trained under.
    ``({}, None)`` without a checkpoint; ``{}`` tables when the checkpoint's embeddings are
    kept by a sharded or cached collection (their rows are not in the state dict)."""
    latest = latest_checkpoint(spec.trainer.checkpoint_dir)
    if latest is None:
        return {}, None
    blob = torch.load(latest, map_location="cpu", weights_only=True)
    rows = _checkpoint_table_rows(blob.get("model", {}), spec)
    tables = {s.name: rows[s.name].float().numpy() for s in spec.schema.sparse if s.name in rows}
    mv = blob.get("counters", {}).get("mapping_version")
    return tables, (None if mv is None else int(mv))


def migrate_model(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  old: Mapping[str, MapperLike], new: Mapping[str, MapperLike],
                  stats: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                  chunk_ids: int = 1 << 20) -> dict[str, Any]:
    """Migrate every table, in every embedding collection of ``model``
    (``embedding_collections``), whose feature's mapper changed (``old[f]`` vs ``new[f]``
    differ or are different objects) using ``stats[f] = (ids, counts)``; optimizer state of
    those tables is migrated likewise. Returns ``{feature: ids_moved}`` for the migrated
    features.

    Where the rows are decides how: in memory (plain, fused, replicated tables) in place;
    a sharded collection's shards with one exchange between its ranks
    (``trainer.migrate_sharded``: collective, every rank calls this with the same mappings
    and statistics); an SSD-cached collection's tables in its row store through the store's
    undo log (``trainer.migrate_row_cache``)."""
    report: dict[str, Any] = {}
    empty = (np.zeros(0, np.int64), np.zeros(0))
    for collection in embedding_collections(model):
        jobs: dict[str, MigrationInputs] = {}
        for feature in collection.feature_names:
            if feature not in old or feature not in new:
                raise TrainerError(f"row migration: mapping sets lack feature {feature!r}")
            o, n = old[feature], new[feature]
            if o is n or o == n:
                continue
            ids, counts = stats.get(feature, empty)
            jobs[feature] = MigrationInputs.from_stats(o, n, ids, counts, chunk_ids)
            report[feature] = int(np.asarray(ids).shape[0])
        if not jobs:
            continue
        if isinstance(collection, ShardedEmbeddingCollection):
            migrate_sharded(collection, jobs)
        elif isinstance(collection, CachedEmbeddingBagCollection):
            migrate_row_cache(collection, jobs)
        elif not isinstance(collection, _MIGRATABLE):
            raise TrainerError(
                f"row migration cannot reach the rows of embedding collection {type(collection).__name__}; "
                "use a plain, fused, sharded or row-cached collection, or keep the mapping fixed "
                "([hash] refit_every_s = 0)")
        else:
            for feature, (weight, states) in _in_memory_tables(collection, optimizer).items():
                if feature in jobs:
                    _check_shapes(weight, states, jobs[feature].old, jobs[feature].new)
                    migrate_block(TensorBlock([weight] + list(states)), jobs[feature])
    return report
