"""Embedding-row migration at an id-mapping version boundary.

When the trainer reaches the first batch of a new mapping version, the rows of every
sparse feature's table are rebuilt for the new mapping so that what the model knows about
each id survives the change:

* An id's *old value* is what the old mapping gave it: the sum of its rows (one row, or
  two for a two-lookup mapper such as ``double``).
* Each new row becomes the **access-weighted mean** of the old values of its member ids
  (the ids the new mapping sends to it), divided by the new mapping's lookups so that a
  two-lookup id's summed rows again equal the mean. Weights are the ids' access counts.
* Optimizer state tensors shaped like the table (Adagrad's ``sum``, Adam's ``exp_avg`` /
  ``exp_avg_sq``, SGD momentum) become the access-weighted mean of the *mean* of the old
  state rows of the member ids (state is per row, not summed by the bag).
* Rows no known id maps to (the reserved range for unseen ids, hashed ranges of unseen
  ids) get the access-weighted mean over all known ids (a "typical id"), divided by the new
  lookups for weights.

Only ids in the statistics move; everything is done in place (same table shapes: a
mapping version never changes a table's row count), in chunks of ``chunk_ids`` ids so
memory stays ``O(rows * dim + chunk_ids * dim)``. Deterministic for fixed inputs.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from engine.errors import TrainerError

__all__ = ["MapperLike", "migrate_table", "migrate_model", "table_parameters"]


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
    """Rewrite ``weight`` [rows, dim] and each tensor in ``states`` (same shape) in place for
    the change ``old`` -> ``new`` mapping, using ids with access ``counts`` (see module
    docstring). ``weight``'s rows must equal both mappers' rows."""
    if weight.dim() != 2 or weight.shape[0] != old.rows or old.rows != new.rows:
        raise TrainerError(
            f"row migration: table shape {tuple(weight.shape)} must be [rows, dim] with rows equal to "
            f"the old ({old.rows}) and new ({new.rows}) mappings' rows"
        )
    for s in states:
        if s.shape != weight.shape:
            raise TrainerError(f"row migration: optimizer state {tuple(s.shape)} is not shaped like the table")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    # a floor so ids counted zero times still move; keeps every weight positive
    w_all = torch.from_numpy(np.asarray(counts, dtype=np.float64)).clamp_min(0.0) + 1e-6
    rows, dim = weight.shape
    dev = weight.device
    tensors = [weight] + list(states)
    num = [torch.zeros(rows, dim, dtype=torch.float64, device=dev) for _ in tensors]
    glob = [torch.zeros(dim, dtype=torch.float64, device=dev) for _ in tensors]
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
        out = torch.empty(rows, dim, dtype=torch.float64, device=dev)
        out[members] = acc[members] / den[members][:, None]
        out[~members] = (glob[t] / total) if total > 0 else dst[~members].to(torch.float64)
        if t == 0:
            out /= lookups
        dst.copy_(out.to(dst.dtype))


def table_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The embedding table parameter of each feature of ``model.embeddings`` (the plain
    ``trainer.embedding.EmbeddingBagCollection``: one ``nn.EmbeddingBag`` per feature)."""
    emb = getattr(model, "embeddings", model)
    bags = getattr(emb, "bags", None)
    if bags is None or not hasattr(emb, "feature_names"):
        raise TrainerError(
            f"row migration supports embedding collections with per-feature nn.EmbeddingBag "
            f"tables ('bags'); {type(emb).__name__} keeps its rows elsewhere. Disable the "
            "periodic re-fit ([hash] refit_every_s = 0) for this placement"
        )
    return {name: bags[name].weight for name in emb.feature_names}


def migrate_model(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  old: Mapping[str, MapperLike], new: Mapping[str, MapperLike],
                  stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Migrate every feature whose mapper changed (``old[f]`` vs ``new[f]`` differ or are
    different objects) using ``stats[f] = (ids, counts)``; optimizer state of those tables
    is migrated likewise. Returns ``{feature: ids_moved}`` for the migrated features."""
    params = table_parameters(model)
    report: dict[str, Any] = {}
    for feature, weight in params.items():
        if feature not in old or feature not in new:
            raise TrainerError(f"row migration: mapping sets lack feature {feature!r}")
        o, n = old[feature], new[feature]
        if o is n or o == n:
            continue
        ids, counts = stats.get(feature, (np.zeros(0, np.int64), np.zeros(0)))
        states = []
        if optimizer is not None:
            st = optimizer.state.get(weight, {})
            states = [v for v in st.values() if torch.is_tensor(v) and v.shape == weight.shape]
        migrate_table(weight.data, [s for s in states], o, n, ids, counts)
        report[feature] = int(np.asarray(ids).shape[0])
    return report
