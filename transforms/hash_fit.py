"""Fitting table mappers from id statistics (pure functions, no I/O).

Variant implemented (``fit_learned``), after Ghaemmaghami et al., "Learning to Collide"
(2022), whose best hash combines access frequency with a learned embedding per id:

1. **Frequency.** The ``hot_fraction`` share of rows goes to the most frequent ids, one
   row each (ties broken by id, so fits are deterministic).
2. **Reserve.** Rows are kept for ids never seen at fit time (they are hashed into
   them): ``reserve_fraction`` of the rows (at least one); with ``auto_reserve``, grown
   so that a reserved row expects the same access mass as a cluster row, the unseen
   ids' share of future accesses estimated by Good-Turing (ids seen once / events).
3. **Learned similarity.** Every other seen id gets a low-dimensional vector
   (``id_vectors``): its smoothed click-through logit from the label statistics, plus the
   top principal components of its current embedding (the rows the current mapping gives
   it, e.g. of a model trained with a generous table, as in the paper), each column
   standardised and weighted.
4. **Mass-balanced clustering.** The remaining rows are shared by clusters of those ids,
   formed by recursive balanced bisection (a k-d tree on the vectors): a node holding
   ``r`` rows is split across its widest dimension at the point where the access mass on
   each side is proportional to the rows each side gets (``r // 2`` and ``r - r // 2``).
   A leaf is one row. So similar ids share a row, and every shared row carries about the
   same access mass instead of the same number of ids.

5. **Memory budget** (``mapper_bytes`` > 0, when storing every seen id exactly would
   exceed it): only the hot ids are stored exactly; the other seen ids are hashed into
   *code buckets* (one small integer each, ``hash_kernels``), each bucket summarised by
   its ids' access mass and mass-weighted mean vector, and the buckets, not the ids, are
   clustered as in 4. Ids sharing a bucket share its cluster; the heaviest id of a bucket
   steers where it goes. One or two bytes per bucket instead of ~26 per id, so a learned mapping
   fits beside a small table: ``fit_within_memory`` picks the rows that leave room for it.

Why not k-means (the paper clusters learned embeddings): Lloyd iterations with a million centroids do not fit
"minutes on two cores" for ten million ids, and k-means balances id counts poorly under
Zipf traffic. Bisection is ``O(n log n log rows)``, deterministic, and balances mass by
construction.

``fit_frequency`` is the frequency-only baseline (hot ids own rows, the rest hashed).
``mapping_report`` measures any mapper on the statistics: collisions and bucket balance.
``fit_mapping_set`` fits a whole feature set's next version as ``[hash]`` configures it
(what ``headrace fit-hash`` and serve's periodic re-fit run between reading statistics
and saving the set).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import numba
import numpy as np

from transforms.config import FitKind, HashConfig, SchemaConfig
from transforms.errors import MappingError
from transforms.hash_kernels import hash_rows, table_entries_within, table_nbytes
from transforms.learned_hash import (
    DEFAULT_CODE_SEED,
    DEFAULT_FALLBACK_SEED,
    FrequencyMapper,
    LearnedMapper,
    code_dtype,
)
from transforms.mappers import IdMapper, MappingSet

__all__ = [
    "IdStats", "LearnedFitParams", "fit_frequency", "fit_learned", "id_vectors",
    "balanced_clusters", "mapping_report", "embedding_vectors", "timed_fit", "fit_mapping_set",
    "fit_within_memory",
]


@dataclasses.dataclass(frozen=True)
class IdStats:
    """Per-id access statistics of one feature: distinct ``ids`` (int64), their access
    ``counts`` (float64, >= 0) and ``label_sums`` (float64, the sum of labels over the
    events that carried the id; used for click-through rates)."""

    ids: np.ndarray
    counts: np.ndarray
    label_sums: np.ndarray

    def __post_init__(self):
        ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        counts = np.ascontiguousarray(self.counts, dtype=np.float64)
        sums = np.ascontiguousarray(self.label_sums, dtype=np.float64)
        if not (ids.ndim == counts.ndim == sums.ndim == 1 and ids.shape == counts.shape == sums.shape):
            raise MappingError(f"IdStats: ids, counts and label_sums must be equal-length 1-d arrays, "
                               f"got {ids.shape}, {counts.shape}, {sums.shape}")
        if counts.size and counts.min() < 0:
            raise MappingError("IdStats: counts must be >= 0")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "label_sums", sums)

    @classmethod
    def from_events(cls, ids: np.ndarray, labels: np.ndarray | None = None) -> "IdStats":
        """Exact statistics of an event stream's ids (one id per event, or labels repeated
        per id by the caller)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        uniq, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
        sums = np.zeros(uniq.shape[0]) if labels is None else np.bincount(
            inv, weights=np.asarray(labels, dtype=np.float64).ravel(), minlength=uniq.shape[0])
        return cls(uniq, counts.astype(np.float64), sums)

    @property
    def distinct(self) -> int:
        return int(self.ids.shape[0])


def _hot_order(stats: IdStats) -> np.ndarray:
    # most frequent first; ties by id so that equal statistics give equal mappings
    return np.lexsort((stats.ids, -stats.counts))


def fit_frequency(stats: IdStats, rows: int, *, hot_fraction: float = 0.5,
                  seed: int = DEFAULT_FALLBACK_SEED, mapper_bytes: int = 0) -> FrequencyMapper:
    """The ``min(distinct, floor(hot_fraction * rows), rows - 1)`` most frequent ids own
    rows ``0..hot-1`` in frequency order; every other id hashes into ``[hot, rows)``.
    ``mapper_bytes`` > 0 caps ``hot`` so that the mapper's table fits in it."""
    if not 0.0 <= hot_fraction <= 1.0:
        raise MappingError(f"hot_fraction must be in [0, 1], got {hot_fraction}")
    hot = min(stats.distinct, int(hot_fraction * rows), rows - 1)
    if mapper_bytes:
        hot = min(hot, _table_entries(mapper_bytes))
    order = _hot_order(stats)[:hot]
    return FrequencyMapper(rows, keys=stats.ids[order], values=np.arange(hot, dtype=np.int64),
                           hot=hot, fallback_base=hot, fallback_rows=rows - hot, seed=seed)


@dataclasses.dataclass(frozen=True)
class LearnedFitParams:
    """Knobs of ``fit_learned`` (see the module docstring)."""

    hot_fraction: float = 0.25  # share of rows owned by the most frequent ids
    reserve_fraction: float = 0.02  # least share of rows for ids never seen at fit time (>= 1 row)
    # grow the reserve to the Good-Turing share of unseen-id mass (off by default: on the
    # planted-structure benchmark it cost cluster rows and did not pay back)
    auto_reserve: bool = False
    label_weight: float = 1.0  # weight of the click-through column in the id vectors
    embedding_weight: float = 1.0  # total weight of the embedding columns
    embedding_components: int = 4  # principal components of the embeddings kept
    prior_strength: float = 20.0  # pseudo-events of the global CTR in each id's smoothed CTR
    # pseudo-accesses added to every id's count when balancing cluster mass, so ids rarely
    # seen at fit time (whose future traffic regresses up) are not packed by the dozen
    mass_prior: float = 0.0
    # bytes the mapper may take (table + bucket codes); 0 = no limit: every seen id is
    # stored exactly (~26 bytes each). See step 5 of the module docstring.
    mapper_bytes: int = 0
    seed: int = DEFAULT_FALLBACK_SEED
    code_seed: int = DEFAULT_CODE_SEED

    @classmethod
    def from_config(cls, hash_cfg: HashConfig) -> "LearnedFitParams":
        """The knobs ``[hash]`` sets; the rest keep their defaults."""
        h = hash_cfg
        return cls(hot_fraction=h.hot_fraction, reserve_fraction=h.reserve_fraction,
                   label_weight=h.label_weight, embedding_weight=h.embedding_weight,
                   embedding_components=h.embedding_components, mapper_bytes=h.max_mapper_bytes)

    def __post_init__(self):
        for name in ("hot_fraction", "reserve_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise MappingError(f"learned fit: {name} must be in [0, 1), got {v}")
        if self.hot_fraction + self.reserve_fraction >= 1.0:
            raise MappingError("learned fit: hot_fraction + reserve_fraction must leave rows for clusters (< 1)")
        if self.label_weight < 0 or self.embedding_weight < 0 or self.prior_strength <= 0 or self.mass_prior < 0:
            raise MappingError("learned fit: weights and mass_prior must be >= 0 and prior_strength > 0")
        if self.embedding_components < 1:
            raise MappingError("learned fit: embedding_components must be >= 1")
        if self.mapper_bytes < 0:
            raise MappingError(f"learned fit: mapper_bytes must be >= 0 (0 = no limit), got {self.mapper_bytes}")


def embedding_vectors(ids: np.ndarray, mapper: IdMapper, weight: np.ndarray, components: int) -> np.ndarray:
    """Each id's current embedding (the row(s) ``mapper`` gives it in table ``weight``
    [rows, dim], summed over lookups) projected on the table's top ``components``
    principal directions: float32 ``[len(ids), components]``. The projection is applied to
    the table first, so memory stays ``O(len(ids) * components)``."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2 or weight.shape[0] != mapper.rows:
        raise MappingError(f"embedding table has shape {weight.shape}; the current mapping needs "
                           f"[{mapper.rows}, dim]")
    k = min(components, weight.shape[1])
    centred = weight - weight.mean(axis=0, keepdims=True)
    # principal directions from the dim x dim covariance: cheap for any row count
    cov = centred.T.astype(np.float64) @ centred.astype(np.float64)
    _, vecs = np.linalg.eigh(cov)
    proj = (weight @ vecs[:, ::-1][:, :k].astype(np.float32)).astype(np.float32)
    rows = mapper.map(np.ascontiguousarray(ids, dtype=np.int64))
    if rows.ndim == 1:
        return proj[rows]
    return sum(proj[r] for r in rows).astype(np.float32)


def id_vectors(stats: IdStats, params: LearnedFitParams, embeddings: np.ndarray | None = None) -> np.ndarray:
    """The low-dimensional vector of each id (float32 ``[distinct, d]``): its smoothed CTR
    logit (weight ``label_weight``) and, when given, its embedding columns (total weight
    ``embedding_weight``, split evenly). Columns are standardised by their access-weighted
    standard deviation, so the weights alone decide what "similar" means."""
    counts, sums = stats.counts, stats.label_sums
    total = counts.sum()
    prior = float(sums.sum() / total) if total > 0 else 0.5
    prior = min(max(prior, 1e-4), 1 - 1e-4)
    ctr = (sums + params.prior_strength * prior) / (counts + params.prior_strength)
    ctr = np.clip(ctr, 1e-6, 1 - 1e-6)
    cols = [(np.log(ctr / (1 - ctr)), params.label_weight)]
    if embeddings is not None:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape[0] != stats.distinct:
            raise MappingError(f"embeddings have {embeddings.shape[0]} rows for {stats.distinct} ids")
        w = params.embedding_weight / np.sqrt(embeddings.shape[1])
        cols += [(embeddings[:, j], w) for j in range(embeddings.shape[1])]
    mass = counts / total if total > 0 else np.full(counts.shape, 1.0 / max(counts.size, 1))
    out = np.empty((stats.distinct, len(cols)), dtype=np.float32)
    for j, (c, w) in enumerate(cols):
        c = c.astype(np.float64)
        mean = float((c * mass).sum())
        std = float(np.sqrt(((c - mean) ** 2 * mass).sum()))
        out[:, j] = ((c - mean) / std * w) if std > 0 else 0.0
    return out


@numba.njit(cache=True, nogil=True)
def _bisect(vectors, mass, nrows, out):
    """Recursive mass-balanced bisection (iterative, explicit stack). ``out[i]`` receives the
    cluster (0..nrows-1) of item i. Items of one node occupy ``order[lo:hi]``."""
    n = vectors.shape[0]
    d = vectors.shape[1]
    order = np.arange(n)
    stack = [(0, n, 0, nrows)]
    while len(stack) > 0:
        lo, hi, r0, r = stack.pop()
        m = hi - lo
        if m == 0:
            continue
        if r == 1:
            for t in range(lo, hi):
                out[order[t]] = r0
            continue
        if m <= r:
            # fewer ids than rows: each id its own row (the rest of the node's rows stay empty)
            for t in range(m):
                out[order[lo + t]] = r0 + t
            continue
        # widest dimension by range (robust to outliers: range of the 1%-99% is costlier)
        best, bestspan = 0, -1.0
        for j in range(d):
            vmin, vmax = np.inf, -np.inf
            for t in range(lo, hi):
                v = vectors[order[t], j]
                if v < vmin:
                    vmin = v
                if v > vmax:
                    vmax = v
            if vmax - vmin > bestspan:
                bestspan = vmax - vmin
                best = j
        seg = order[lo:hi].copy()
        keys = np.empty(m, dtype=np.float64)
        for t in range(m):
            keys[t] = vectors[seg[t], best]
        idx = np.argsort(keys)
        total = 0.0
        for t in range(m):
            order[lo + t] = seg[idx[t]]
            total += mass[seg[t]]
        rl = r // 2
        target = total * rl / r
        acc = 0.0
        split = lo
        while split < hi - 1 and acc + mass[order[split]] * 0.5 < target:
            acc += mass[order[split]]
            split += 1
        # each side needs at least one id; a side with fewer ids than rows is fine
        if split == lo:
            split = lo + 1
        stack.append((lo, split, r0, rl))
        stack.append((split, hi, r0 + rl, r - rl))


def balanced_clusters(vectors: np.ndarray, mass: np.ndarray, clusters: int) -> np.ndarray:
    """Assign each row of ``vectors`` to one of ``clusters`` clusters (int64 in
    ``[0, clusters)``) by mass-balanced recursive bisection. Deterministic."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    mass = np.ascontiguousarray(mass, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != mass.shape[0]:
        raise MappingError(f"vectors {vectors.shape} and mass {mass.shape} disagree")
    if clusters < 1:
        raise MappingError(f"clusters must be >= 1, got {clusters}")
    out = np.zeros(vectors.shape[0], dtype=np.int64)
    if vectors.shape[0]:
        _bisect(vectors, mass, clusters, out)
    return out


def fit_learned(stats: IdStats, rows: int, params: LearnedFitParams = LearnedFitParams(),
                embeddings: np.ndarray | None = None) -> LearnedMapper:
    """Fit the learned mapping of one feature (the variant in the module docstring).

    ``embeddings``: optional float32 ``[distinct, k]`` per-id vectors aligned with
    ``stats.ids`` (e.g. ``embedding_vectors`` of the current model). Deterministic.
    """
    if rows < 2:
        raise MappingError(f"learned fit needs rows >= 2 (one shared, one reserved), got {rows}")
    min_reserve = max(1, int(params.reserve_fraction * rows))
    order = _hot_order(stats)
    if params.mapper_bytes and table_nbytes(stats.distinct) > params.mapper_bytes:
        return _fit_learned_codes(stats, rows, params, embeddings, order, min_reserve)
    if stats.distinct <= rows - min_reserve:
        # everything seen fits: every id its own row, no clustering needed
        hot = stats.distinct
        budget = rows - min_reserve
        return LearnedMapper(rows, keys=stats.ids[order], values=np.arange(hot, dtype=np.int64), hot=hot,
                             fallback_base=budget, fallback_rows=rows - budget, seed=params.seed)
    hot = min(int(params.hot_fraction * rows), rows - min_reserve - 1)
    shared = rows - hot
    hot_idx, tail_idx = order[:hot], order[hot:]
    reserve = min_reserve
    if params.auto_reserve:
        reserve = max(reserve, _unseen_rows(stats, tail_idx, shared))
    reserve = min(reserve, shared - 1)
    clusters = shared - reserve
    budget = hot + clusters
    tail = IdStats(stats.ids[tail_idx], stats.counts[tail_idx], stats.label_sums[tail_idx])
    emb = None if embeddings is None else np.asarray(embeddings)[tail_idx]
    vectors = id_vectors(tail, params, emb)
    # a small floor on top of the prior, so ids never accessed in the window still spread out
    mass = tail.counts + params.mass_prior + 1e-3
    assign = balanced_clusters(vectors, mass, clusters)
    keys = np.concatenate([stats.ids[hot_idx], tail.ids])
    values = np.concatenate([np.arange(hot, dtype=np.int64), hot + assign])
    return LearnedMapper(rows, keys=keys, values=values, hot=hot, fallback_base=budget,
                         fallback_rows=rows - budget, seed=params.seed)


def _table_entries(mapper_bytes: int) -> int:
    n = table_entries_within(mapper_bytes)
    if n < 0:
        raise MappingError(f"mapper_bytes = {mapper_bytes} cannot hold even an empty id table "
                           f"({table_nbytes(0)} bytes); give the mapper more bytes or 0 for no limit")
    return n


def _fit_learned_codes(stats: IdStats, rows: int, params: LearnedFitParams, embeddings: np.ndarray | None,
                       order: np.ndarray, min_reserve: int) -> LearnedMapper:
    """``fit_learned`` within ``params.mapper_bytes``: hot ids in the table, the other seen
    ids through clustered code buckets (step 5 of the module docstring)."""
    hot = min(int(params.hot_fraction * rows), rows - min_reserve - 1, stats.distinct,
              _table_entries(params.mapper_bytes))
    hot_idx, tail_idx = order[:hot], order[hot:]
    reserve = min_reserve
    if params.auto_reserve:
        reserve = max(reserve, _unseen_rows(stats, tail_idx, rows - hot))
    clusters = rows - hot - min(reserve, rows - hot - 1)
    dtype = code_dtype(clusters)
    buckets = min((params.mapper_bytes - table_nbytes(hot)) // dtype.itemsize, 2**32 - 1)
    hot_keys, hot_rows = stats.ids[hot_idx], np.arange(hot, dtype=np.int64)
    if buckets < 1 or tail_idx.size == 0:
        # no room for codes: the rest is hashed over every row the hot ids leave
        return LearnedMapper(rows, keys=hot_keys, values=hot_rows, hot=hot, fallback_base=hot,
                             fallback_rows=rows - hot, seed=params.seed)
    tail = IdStats(stats.ids[tail_idx], stats.counts[tail_idx], stats.label_sums[tail_idx])
    emb = None if embeddings is None else np.asarray(embeddings)[tail_idx]
    vectors = id_vectors(tail, params, emb).astype(np.float64)
    mass = tail.counts + params.mass_prior + 1e-3
    bucket = hash_rows(tail.ids, params.code_seed, 0, buckets)
    occupied, inv = np.unique(bucket, return_inverse=True)
    bucket_mass = np.bincount(inv, weights=mass, minlength=occupied.size)
    bucket_vectors = np.stack([np.bincount(inv, weights=mass * vectors[:, j], minlength=occupied.size)
                               for j in range(vectors.shape[1])], axis=1) / bucket_mass[:, None]
    codes = np.zeros(buckets, dtype=dtype)
    codes[occupied] = balanced_clusters(bucket_vectors, bucket_mass, clusters) + 1
    return LearnedMapper(rows, keys=hot_keys, values=hot_rows, hot=hot, fallback_base=hot + clusters,
                         fallback_rows=rows - hot - clusters, seed=params.seed, codes=codes,
                         code_seed=params.code_seed, code_base=hot)


def fit_within_memory(total_bytes: int, row_bytes: int, fit: Callable[[int], IdMapper],
                      min_rows: int = 2) -> IdMapper:
    """``fit(rows)`` for the most rows such that the embedding table plus the mapper fit in
    ``total_bytes``: ``rows * row_bytes + mapper.nbytes <= total_bytes`` (binary search over
    rows; the total must grow with rows, as it does for every fit here).

    Example: a learned mapping whose table and codes take about a fifth of 40 KB, the
    rest for 16-dim float32 rows::

        fit_within_memory(40_960, 64, lambda r: fit_learned(stats, r, LearnedFitParams(mapper_bytes=8192)))
    """
    lo, hi = min_rows, total_bytes // row_bytes
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        mapper = fit(mid)
        if mid * row_bytes + mapper.nbytes <= total_bytes:
            best, lo = mapper, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise MappingError(f"no mapper with >= {min_rows} rows of {row_bytes} bytes fits in {total_bytes} bytes")
    return best


def _unseen_rows(stats: IdStats, tail_idx: np.ndarray, shared: int) -> int:
    """Rows of the ``shared`` ones to reserve for unseen ids so that, in expectation, a
    reserved row carries the same access mass as a cluster row. The share of future
    accesses to ids never seen is the Good-Turing estimate: ids seen once / events."""
    total = float(stats.counts.sum())
    if total <= 0:
        return 1
    p_new = float((stats.counts < 1.5).sum()) / total
    tail_share = float(stats.counts[tail_idx].sum()) / total
    denom = p_new + (1.0 - p_new) * tail_share
    return int(round(shared * p_new / denom)) if denom > 0 else 1


def mapping_report(mapper: IdMapper, stats: IdStats) -> dict[str, Any]:
    """How ``mapper`` spreads the ids of ``stats``: ``colliding_ids`` (seen ids that share a
    row with another seen id), ``collision_mass`` (share of accesses landing on shared
    rows), ``rows_used``, ``shared_rows`` and the bucket mass balance over rows shared by
    two or more ids: ``mass_max_over_mean`` and ``mass_cv`` (coefficient of variation).
    Rows owned by one hot id are left out of the balance: they are unbalanced on purpose.
    A two-lookup mapper counts each of an id's rows. ``mapper_bytes``: the mapper's own
    memory (``IdMapper.nbytes``), to add to the embedding table's."""
    if stats.distinct == 0:
        return {"distinct_ids": 0, "rows": mapper.rows, "rows_used": 0, "colliding_ids": 0,
                "collision_mass": 0.0, "shared_rows": 0, "mass_max_over_mean": 0.0, "mass_cv": 0.0,
                "mapper_bytes": mapper.nbytes}
    rows = mapper.map(stats.ids)
    rows = rows.reshape(-1, stats.distinct) if rows.ndim == 2 else rows[None, :]
    per_row_ids = np.zeros(mapper.rows, dtype=np.int64)
    per_row_mass = np.zeros(mapper.rows, dtype=np.float64)
    for r in rows:
        per_row_ids += np.bincount(r, minlength=mapper.rows)
        per_row_mass += np.bincount(r, weights=stats.counts, minlength=mapper.rows)
    shared = np.zeros(stats.distinct, dtype=bool)
    for r in rows:
        shared |= per_row_ids[r] > 1
    used = per_row_mass[per_row_ids > 1]
    total = stats.counts.sum()
    mean = used.mean() if used.size else 0.0
    return {
        "distinct_ids": stats.distinct,
        "rows": mapper.rows,
        "rows_used": int((per_row_ids > 0).sum()),
        "colliding_ids": int(shared.sum()),
        "collision_mass": float(stats.counts[shared].sum() / total) if total > 0 else 0.0,
        "shared_rows": int(used.size),
        "mass_max_over_mean": float(used.max() / mean) if mean > 0 else 0.0,
        "mass_cv": float(used.std() / mean) if mean > 0 else 0.0,
        "mapper_bytes": mapper.nbytes,
    }


def timed_fit(fn, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``: fit time as reported by fit-hash."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def fit_mapping_set(schema: SchemaConfig, hash_cfg: HashConfig, stats: Mapping[str, IdStats],
                    current: MappingSet, tables: Mapping[str, np.ndarray] | None = None,
                    tables_mapping: MappingSet | None = None) -> tuple[MappingSet, dict[str, Any]]:
    """Version ``current.version + 1`` of the mapping set: one mapper per sparse feature of
    ``schema``, fitted as ``hash_cfg.fit`` says from ``stats[feature]``. A feature with fewer
    than ``hash_cfg.min_events_to_fit`` counted events keeps its current mapper.

    ``tables``: the current model's embedding tables ``{feature: [rows, dim]}``, trained
    under ``tables_mapping`` (default ``current``); a learned fit uses them as id vectors
    when ``embedding_weight > 0``. Pure apart from timing. Returns the new set and
    ``{feature: report}`` (``mapping_report`` of the new mapper, with ``fitted``, ``events``,
    ``fit_s``, ``used_embeddings`` and ``before``: the current mapper's report).
    """
    params = LearnedFitParams.from_config(hash_cfg)
    tables = tables or {}
    tables_mapping = tables_mapping or current
    mappers: dict[str, IdMapper] = {}
    report: dict[str, Any] = {}
    for s in schema.sparse:
        st = stats.get(s.name)
        events = 0.0 if st is None else float(st.counts.sum())
        if st is None or st.distinct == 0 or events < hash_cfg.min_events_to_fit:
            mappers[s.name] = current[s.name]
            report[s.name] = {"fitted": False, "events": events,
                              "reason": f"fewer than min_events_to_fit = {hash_cfg.min_events_to_fit} events"}
            continue
        (mapper, emb), fit_s = timed_fit(_fit_feature, hash_cfg.fit, st, s.name, s.rows, params,
                                         tables.get(s.name), tables_mapping)
        mappers[s.name] = mapper
        rep = mapping_report(mapper, st)
        rep.update({"fitted": True, "mapper": mapper.name, "events": events, "fit_s": round(fit_s, 4),
                    "used_embeddings": emb is not None, "before": mapping_report(current[s.name], st)})
        report[s.name] = rep
    return MappingSet(current.version + 1, mappers), report


def _fit_feature(kind: FitKind, stats: IdStats, feature: str, rows: int, params: LearnedFitParams,
                 table: np.ndarray | None, table_mappings: MappingSet) -> tuple[IdMapper, np.ndarray | None]:
    """One feature's fitted mapper and the embedding vectors it used (None: none)."""
    if kind is FitKind.FREQUENCY:
        return fit_frequency(stats, rows, hot_fraction=params.hot_fraction, seed=params.seed,
                             mapper_bytes=params.mapper_bytes), None
    emb = None
    if table is not None and params.embedding_weight > 0:
        emb = embedding_vectors(stats.ids, table_mappings[feature], table, params.embedding_components)
    return fit_learned(stats, rows, params, emb), emb
