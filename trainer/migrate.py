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
mapping version never changes a table's row count), in chunks of ``chunk_ids`` ids so
memory stays ``O(rows * dim + chunk_ids * dim)``. Deterministic for fixed inputs.

Where the tables are (``model_tables`` in a live model: the fused collection's per-table
views of its buffer and optimizer state, or a plain collection's ``nn.EmbeddingBag`` weights
and their torch optimizer state; ``checkpoint_tables`` in the newest checkpoint, for a
learned fit's id vectors) is decided here, next to the migration that rewrites them, so
callers never name state-dict keys.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from trainer.checkpoint import latest_checkpoint
from trainer.config import TrainSpec
from trainer.embedding import EmbeddingBagCollection
from trainer.errors import TrainerError
from trainer.fused_embedding import FusedEmbeddingBagCollection

__all__ = ["MapperLike", "migrate_table", "migrate_model", "model_tables", "checkpoint_tables"]


class MapperLike(Protocol):
    rows: int
    lookups: int

    def map(self, ids: np.ndarray) -> np.ndarray: ...


def _rows(mapper: MapperLike, ids: np.ndarray) -> torch.Tensor:
    r = np.asarray(mapper.map(ids))
    return torch.from_numpy(np.ascontiguousarray(r.reshape(-1, ids.shape[0]))).to(torch.int64)


@torch.no_grad()
def migrate_table(weight: torch.Tensor, states: list[torch.Tensor], old: MapperLike, new: MapperLike,
                  ids: np.ndarray, counts: np.ndarray, *, chunk_ids: int = 1 << 20) -> None:
    """Rewrite ``weight`` [rows, dim] and each tensor in ``states`` ([rows] or [rows, k]: one
    state row per table row) in place for the change ``old`` -> ``new`` mapping, using ids
    with access ``counts`` (see module docstring). ``weight``'s rows must equal both mappers'
    rows."""
    if weight.dim() != 2 or weight.shape[0] != old.rows or old.rows != new.rows:
        raise TrainerError(
            f"row migration: table shape {tuple(weight.shape)} must be [rows, dim] with rows equal to "
            f"the old ({old.rows}) and new ({new.rows}) mappings' rows"
        )
    for s in states:
        if s.dim() not in (1, 2) or s.shape[0] != weight.shape[0]:
            raise TrainerError(f"row migration: optimizer state {tuple(s.shape)} has not one row per "
                               f"table row ({weight.shape[0]})")
    # [rows] state (one value per row) as a [rows, 1] view: written through in place
    states = [s.unsqueeze(1) if s.dim() == 1 else s for s in states]
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    # a floor so ids counted zero times still move; keeps every weight positive
    w_all = torch.from_numpy(np.asarray(counts, dtype=np.float64)).clamp_min(0.0) + 1e-6
    rows = weight.shape[0]
    dev = weight.device
    tensors = [weight] + list(states)
    num = [torch.zeros(rows, t.shape[1], dtype=torch.float64, device=dev) for t in tensors]
    glob = [torch.zeros(t.shape[1], dtype=torch.float64, device=dev) for t in tensors]
    den = torch.zeros(rows, dtype=torch.float64, device=dev)
    total = 0.0
    for lo in range(0, ids.shape[0], chunk_ids):
        chunk = ids[lo:lo + chunk_ids]
        w = w_all[lo:lo + chunk_ids].to(dev)
        old_rows = _rows(old, chunk).to(dev)
        new_rows = _rows(new, chunk).to(dev)
        for t, (src, acc) in enumerate(zip(tensors, num)):
            value = sum(src[r].to(torch.float64) for r in old_rows)
            if t > 0:
                value = value / old_rows.shape[0]  # state: mean of the old rows, not their sum
            weighted = value * w[:, None]
            glob[t] += weighted.sum(dim=0)
            for r in new_rows:
                acc.index_add_(0, r, weighted)
        for r in new_rows:
            den.index_add_(0, r, w)
        total += float(w.sum())
    lookups = float(new.lookups)
    members = den > 0
    for t, (dst, acc) in enumerate(zip(tensors, num)):
        out = torch.empty(rows, dst.shape[1], dtype=torch.float64, device=dev)
        out[members] = acc[members] / den[members][:, None]
        out[~members] = (glob[t] / total) if total > 0 else dst[~members].to(torch.float64)
        if t == 0:
            out /= lookups
        dst.copy_(out.to(dst.dtype))


def model_tables(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                 ) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    """``{feature: (table rows [rows, dim], [optimizer state with one row per table row])}``
    of ``model.embeddings``, as tensors that write through to the model: the fused
    collection's views into its buffer and state, or a plain collection's ``nn.EmbeddingBag``
    weights and the state ``optimizer`` keeps for them."""
    emb = getattr(model, "embeddings", model)  # a DLRM, or a collection itself
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
        f"row migration supports the plain (fused) embedding collection; {type(emb).__name__} "
        "keeps its rows elsewhere (sharded or SSD-cached). Disable the periodic re-fit "
        "([hash] refit_every_s = 0) for this placement"
    )


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
                  stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Migrate every feature whose mapper changed (``old[f]`` vs ``new[f]`` differ or are
    different objects) using ``stats[f] = (ids, counts)``; optimizer state of those tables
    is migrated likewise. Returns ``{feature: ids_moved}`` for the migrated features."""
    report: dict[str, Any] = {}
    for feature, (weight, states) in model_tables(model, optimizer).items():
        if feature not in old or feature not in new:
            raise TrainerError(f"row migration: mapping sets lack feature {feature!r}")
        o, n = old[feature], new[feature]
        if o is n or o == n:
            continue
        ids, counts = stats.get(feature, (np.zeros(0, np.int64), np.zeros(0)))
        migrate_table(weight, states, o, n, ids, counts)
        report[feature] = int(np.asarray(ids).shape[0])
    return report
