"""Per-feature id access statistics kept with the batch cache (for fitting id mappings).

Layout: a log-structured store in two LMDB sub-databases of the cache's environment, so
that counting a batch costs one LMDB put per feature instead of one per distinct id.

* ``META_DB`` (``id_stats.v2.log``), written by every batch:

  - ``<feature> 0x00 'd' >Q n``: the delta of the feature's ``n``-th update: its
    distinct ids (first-seen order), the access count and label sum of each, and the
    update's totals (events, label sum). See ``_HEADER`` for the byte layout.
  - ``<feature> 0x00 's'``: ``<QQ (first, next)``: deltas ``first .. next - 1`` are
    pending (not yet folded into the base).

* ``HEAD_DB`` (``id_stats.v2.head``), rewritten only by compaction:

  - ``<feature> 0x00 'b'``: the compacted base: at most ``head_capacity`` ids (sorted)
    with their exact counts and label sums, and the totals of every folded delta.
  - ``<feature> 0x00 'k'``: a count-min sketch (``transforms.sketch``) of the mass evicted
    from the head (absent until the first eviction).

Exactness: updates run inside the cache's write transaction of each batch (``attach``
registers a write hook; the cache runs hooks only for batches it stores), so the
statistics cover exactly the batches committed to the cache: a batch written once is
counted once, a duplicate write counts nothing, and a crash loses neither or both.

Compaction folds a feature's pending deltas into its base, in the same write transaction
as the update that triggers it. ``update_batch`` compacts at most one feature per write
(the one with the most pending deltas, once it has ``compact_after_deltas``), so the
features' compactions stagger instead of all landing on one write; a feature with twice
that many pending deltas is compacted regardless. Hence a feature has at most
``compact_after_deltas + #features`` pending deltas (or ``2 * compact_after_deltas``).

Bounded memory/disk: per feature one base of at most ``head_capacity`` ids, one sketch
and the pending deltas; an entry takes 8 bytes of id plus a count and a label sum, each
stored in the narrowest of 1/2/4 bytes that holds it when whole and non-negative (0/1
labels), else as float64: 10 to 24 bytes. When the merged head outgrows
``head_capacity``, the lowest-count ids are evicted into the sketch until
``head_capacity`` remain (ties: the larger ids go).

``read`` performs the same merge on the fly (without storing it): compacting never
changes what ``read`` returns, and until an eviction happens the result is the exact
count over every stored batch whenever compaction ran. It returns the head ids with
``count = head count + sketch estimate`` of mass they may have had evicted earlier: exact
for ids never evicted, up to sketch over-estimation (bounded by
``e * evicted_mass / sketch_width`` with high probability; zero while nothing was
evicted); ids only in the sketch are not listed (the fit treats them as unseen and hashes
them into the reserved range).
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import CacheError
from transforms.config import HashConfig, SchemaConfig
from transforms.elements import id_column
from transforms.hash_fit import IdStats
from transforms.hash_kernels import mix64
from transforms.sketch import CountMinSketch

__all__ = ["IdStatsStore", "read_id_stats", "HEAD_DB", "META_DB", "DEFAULT_COMPACT_AFTER_DELTAS"]

# ".v2": the per-id layout of the first version lived in "id_stats.head"/"id_stats.meta";
# new names make a cache written by it start fresh statistics instead of misreading them.
HEAD_DB = "id_stats.v2.head"
META_DB = "id_stats.v2.log"

#: Pending deltas per feature that trigger its compaction. Compaction costs about the
#: same per pending entry whatever this is (an argsort of the pending ids, then a linear
#: merge with the base), so this sets the size of one compaction (a few tens of ms for a
#: high-cardinality feature: 256 Criteo-shaped batches are ~900k pending entries) and
#: what a read merges, not the amortised cost per batch.
DEFAULT_COMPACT_AFTER_DELTAS = 256

# magic, number of ids, events (accesses), label sum, bytes per count, bytes per label
# sum (see _WIDTH_DTYPE); then the arrays: ids int64[n], label sums[n], counts[n].
_HEADER = struct.Struct("<8sQQdBB6x")
_DELTA_MAGIC = b"HRIDD002"
_BASE_MAGIC = b"HRIDB002"
_STATE = struct.Struct("<QQ")
_EMPTY_I = np.zeros(0, np.int64)
_EMPTY_F = np.zeros(0, np.float64)
_HASH_SEED = 0x2545F4914F6CDD1D  # slot hash of the aggregation table (any odd constant)


# ------------------------------------------------------------------ pure logic

class _Run:
    """Distinct ``ids`` (sorted, except in a delta) with float64 ``counts`` / ``sums``,
    plus the totals (``events``, ``label_sum``) of the updates they came from."""

    __slots__ = ("ids", "counts", "sums", "events", "label_sum")

    def __init__(self, ids, counts, sums, events: int = 0, label_sum: float = 0.0):
        self.ids, self.counts, self.sums = ids, counts, sums
        self.events, self.label_sum = int(events), float(label_sum)


@numba.njit(nogil=True, cache=True)
def _hash_segments(ids, counts, sums, bounds):
    """For each segment ``bounds[s] .. bounds[s + 1] - 1`` of ``ids`` (ids may repeat):
    its distinct ids in first-seen order, with summed ``counts`` (1 per id when
    ``counts`` is empty) and ``sums``. Returns
    the segments' outputs concatenated and their bounds. O(n) open addressing."""
    nseg = bounds.shape[0] - 1
    longest = 0
    for s in range(nseg):
        longest = max(longest, bounds[s + 1] - bounds[s])
    size = 16
    while size < 2 * longest:
        size *= 2
    mask = np.uint64(size - 1)
    seed = np.uint64(_HASH_SEED)
    owner = np.zeros(size, np.int64)  # segment + 1 owning the slot: no clearing between segments
    keys = np.empty(size, np.int64)
    index = np.empty(size, np.int64)
    total = bounds[nseg] - bounds[0]
    out_ids = np.empty(total, np.int64)
    out_c = np.empty(total, np.float64)
    out_s = np.empty(total, np.float64)
    out_bounds = np.zeros(nseg + 1, np.int64)
    unit = counts.shape[0] == 0
    w = 0
    for s in range(nseg):
        tag = s + 1
        nd = 0
        for i in range(bounds[s], bounds[s + 1]):
            x = ids[i]
            h = mix64(x, seed) & mask
            while owner[h] == tag and keys[h] != x:
                h = (h + np.uint64(1)) & mask
            if owner[h] != tag:
                owner[h] = tag
                keys[h] = x
                index[h] = nd
                out_ids[w + nd] = x
                out_c[w + nd] = 1.0 if unit else counts[i]
                out_s[w + nd] = sums[i]
                nd += 1
            else:
                j = w + index[h]
                out_c[j] += 1.0 if unit else counts[i]
                out_s[j] += sums[i]
        w += nd
        out_bounds[s + 1] = w
    return out_ids[:w], out_c[:w], out_s[:w], out_bounds


@numba.njit(nogil=True, cache=True)
def _sum_in_order(ids, counts, sums, order):
    """Distinct ids in ``order`` (an argsort of ``ids``) with summed counts and sums."""
    n = order.shape[0]
    out_ids = np.empty(n, np.int64)
    out_c = np.empty(n, np.float64)
    out_s = np.empty(n, np.float64)
    w = -1
    for k in range(n):
        i = order[k]
        x = ids[i]
        if w < 0 or x != out_ids[w]:
            w += 1
            out_ids[w], out_c[w], out_s[w] = x, counts[i], sums[i]
        else:
            out_c[w] += counts[i]
            out_s[w] += sums[i]
    return out_ids[:w + 1], out_c[:w + 1], out_s[:w + 1]


def _sum_by_id(ids: np.ndarray, counts: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct sorted ids with summed counts and sums, for many ids (a compaction's
    pending deltas: hundreds of thousands). numpy's vectorised argsort beats the hash
    kernel here (a table this size misses the caches), and a heap or pairwise merge of
    sorted deltas; so deltas are stored unsorted, sparing the hot path a sort."""
    return _sum_in_order(ids, counts, sums, np.argsort(ids))


@numba.njit(nogil=True, cache=True)
def _merge_sorted(a_ids, a_c, a_s, b_ids, b_c, b_s):
    """Union of two distinct sorted runs, adding counts and sums of common ids. O(a + b)."""
    n = a_ids.shape[0] + b_ids.shape[0]
    ids = np.empty(n, np.int64)
    c = np.empty(n, np.float64)
    s = np.empty(n, np.float64)
    i = j = w = 0
    while i < a_ids.shape[0] and j < b_ids.shape[0]:
        if a_ids[i] < b_ids[j]:
            ids[w], c[w], s[w] = a_ids[i], a_c[i], a_s[i]
            i += 1
        elif b_ids[j] < a_ids[i]:
            ids[w], c[w], s[w] = b_ids[j], b_c[j], b_s[j]
            j += 1
        else:
            ids[w], c[w], s[w] = a_ids[i], a_c[i] + b_c[j], a_s[i] + b_s[j]
            i += 1
            j += 1
        w += 1
    while i < a_ids.shape[0]:
        ids[w], c[w], s[w] = a_ids[i], a_c[i], a_s[i]
        i += 1
        w += 1
    while j < b_ids.shape[0]:
        ids[w], c[w], s[w] = b_ids[j], b_c[j], b_s[j]
        j += 1
        w += 1
    return ids[:w], c[:w], s[:w]


def _fold(base: _Run, deltas: Sequence[_Run]) -> _Run:
    """``base`` with ``deltas`` (each with distinct ids, in any order) added."""
    if not deltas:
        return base
    events = base.events + sum(d.events for d in deltas)
    label_sum = base.label_sum + sum(d.label_sum for d in deltas)
    ids, counts, sums = _sum_by_id(np.concatenate([d.ids for d in deltas]),
                                   np.concatenate([d.counts for d in deltas]),
                                   np.concatenate([d.sums for d in deltas]))
    if base.ids.size == 0:
        merged = _Run(ids, counts, sums)
    else:
        merged = _Run(*_merge_sorted(base.ids, base.counts, base.sums, ids, counts, sums))
    merged.events, merged.label_sum = events, label_sum
    return merged


def _evict(run: _Run, capacity: int) -> tuple[_Run, _Run | None]:
    """Split ``run`` into the ``capacity`` highest-count ids (ties: the smaller ids stay)
    and the evicted rest (None when nothing is evicted). O(n): a partition, no sort."""
    n = run.ids.size
    if n <= capacity:
        return run, None
    threshold = np.partition(run.counts, n - capacity)[n - capacity]
    keep = run.counts > threshold
    ties = np.flatnonzero(run.counts == threshold)  # ascending ids: ids are sorted
    keep[ties[:capacity - int(np.count_nonzero(keep))]] = True
    gone = ~keep
    head = _Run(run.ids[keep], run.counts[keep], run.sums[keep], run.events, run.label_sum)
    return head, _Run(run.ids[gone], run.counts[gone], run.sums[gone])


def _flatten(column: pa.Array | pa.ChunkedArray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids of one feature and the label of each id's event (list columns are flattened,
    the event label repeated for each value; null ids are skipped)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(column)
        lab = np.repeat(labels, lengths)
        if values.null_count:
            keep = values.is_valid().to_numpy(zero_copy_only=False)
            return values.to_numpy(zero_copy_only=False)[keep].astype(np.int64), lab[keep]
        return values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), lab
    if column.null_count:
        keep = column.is_valid().to_numpy(zero_copy_only=False)
        return column.to_numpy(zero_copy_only=False)[keep].astype(np.int64), labels[keep]
    return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), labels


# ------------------------------------------------------------------ encoding

# width byte -> dtype of a counts / label-sums column: non-negative integral values are
# stored in the narrowest unsigned type that holds them (a batch's counts are mostly 1,
# its label sums mostly 0/1), anything else as float64.
_WIDTH_DTYPE = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<f8")}


_U32_MAX = float(np.iinfo(np.uint32).max)


def _integral(values: np.ndarray) -> bool:
    """All values non-negative whole numbers (0/1 labels, counts)."""
    return values.size == 0 or (float(values.min()) >= 0 and bool(np.all(np.floor(values) == values)))


def _width(values: np.ndarray, integral: bool) -> int:
    top = float(values.max()) if values.size else 0.0
    if not integral or top > _U32_MAX:
        return 8
    return 1 if top <= 0xFF else 2 if top <= 0xFFFF else 4


def _encode(magic: bytes, run: _Run, sums_integral: bool) -> bytes:
    cw, sw = _width(run.counts, True), _width(run.sums, sums_integral)
    return b"".join((_HEADER.pack(magic, run.ids.size, run.events, run.label_sum, cw, sw),
                     run.ids.astype("<i8", copy=False).tobytes(),
                     run.sums.astype(_WIDTH_DTYPE[sw], copy=False).tobytes(),
                     run.counts.astype(_WIDTH_DTYPE[cw], copy=False).tobytes()))


def _decode(raw: Any, magic: bytes, what: str) -> _Run:
    """The run in ``raw``; ids may be a view of ``raw`` (the caller copies before a read
    transaction ends), counts and sums are float64 copies."""
    size = len(raw)
    if size < _HEADER.size:
        raise CacheError(f"id stats: {what} is truncated ({size} bytes)")
    got, n, events, label_sum, cw, sw = _HEADER.unpack_from(raw)
    if got != magic or cw not in _WIDTH_DTYPE or sw not in _WIDTH_DTYPE or size != _HEADER.size + n * (8 + cw + sw):
        raise CacheError(f"id stats: {what} is not a {magic!r} blob of {n} ids (magic {got!r}, widths {cw}/{sw}, "
                         f"{size} bytes); the statistics are corrupt: delete the id_stats sub-databases to "
                         "rebuild them")
    off = _HEADER.size
    ids = np.frombuffer(raw, dtype="<i8", count=n, offset=off)
    sums = np.frombuffer(raw, dtype=_WIDTH_DTYPE[sw], count=n, offset=off + 8 * n).astype(np.float64)
    counts = np.frombuffer(raw, dtype=_WIDTH_DTYPE[cw], count=n, offset=off + (8 + sw) * n).astype(np.float64)
    return _Run(ids, counts, sums, events, label_sum)


def _prefix(feature: str) -> bytes:
    raw = feature.encode()
    if b"\x00" in raw:
        raise CacheError(f"id stats: feature name {feature!r} contains a NUL byte")
    return raw + b"\x00"


def _delta_key(prefix: bytes, n: int) -> bytes:
    return prefix + b"d" + n.to_bytes(8, "big")


class IdStatsStore:
    """Reads and updates id statistics inside caller-owned LMDB transactions.

    ``head_db`` / ``meta_db`` are the ``HEAD_DB`` / ``META_DB`` sub-database handles of one
    environment. All methods take the transaction to run in; ``update*`` and ``compact``
    need a write transaction. Not safe for concurrent writers (the cache has one writer).
    """

    def __init__(self, head_db: Any, meta_db: Any, features: Sequence[str], label: str, *,
                 head_capacity: int = 1_000_000, sketch_width: int = 1 << 16, sketch_depth: int = 4,
                 compact_after_deltas: int = DEFAULT_COMPACT_AFTER_DELTAS):
        if head_capacity < 2:
            raise CacheError(f"id stats: head_capacity must be >= 2, got {head_capacity}")
        if compact_after_deltas < 1:
            raise CacheError(f"id stats: compact_after_deltas must be >= 1, got {compact_after_deltas}")
        self.head_db, self.meta_db = head_db, meta_db
        self.features = tuple(features)
        self._prefixes = {f: _prefix(f) for f in self.features}
        self.label = label
        self.head_capacity = int(head_capacity)
        self.sketch_width, self.sketch_depth = int(sketch_width), int(sketch_depth)
        self.compact_after_deltas = int(compact_after_deltas)

    @classmethod
    def open(cls, cache: Any, schema: SchemaConfig, hash_cfg: HashConfig, **kwargs: Any) -> "IdStatsStore":
        """The statistics of ``cache`` (a ``storage.batch_cache.BatchCache``) for the sparse
        features of ``schema``, sized by ``hash_cfg``: the read side (``read_id_stats``).
        ``kwargs`` go to the constructor (e.g. ``compact_after_deltas``)."""
        return cls(cache.open_db(HEAD_DB), cache.open_db(META_DB), [s.name for s in schema.sparse],
                   schema.label, head_capacity=hash_cfg.stats_head_capacity,
                   sketch_width=hash_cfg.sketch_width, sketch_depth=hash_cfg.sketch_depth, **kwargs)

    @classmethod
    def attach(cls, cache: Any, schema: SchemaConfig, hash_cfg: HashConfig, **kwargs: Any) -> "IdStatsStore":
        """``open``, then register a write hook so every batch written to ``cache`` from
        now on updates the statistics (the write side)."""
        store = cls.open(cache, schema, hash_cfg, **kwargs)
        cache.add_write_hook(store.on_write)
        return store

    # ------------------------------------------------------------------ writes

    def on_write(self, txn: Any, pb: Any, seq: int) -> None:
        """Write hook: count the ids of ``pb.batch`` (a ``ProcessedBatch``)."""
        self.update_batch(txn, pb.batch)

    def update_batch(self, txn: Any, batch: pa.RecordBatch) -> None:
        """Count every sparse feature's raw ids of ``batch`` (columns ``<feature>.id`` and
        the label column): one delta per feature with ids, then at most one compaction
        (see the module docstring). A batch without rows changes nothing. Validates every
        column before writing anything."""
        if batch.num_rows == 0 or not self.features:
            return
        names = batch.schema.names
        if self.label not in names:
            raise CacheError(f"id stats: batch has no label column {self.label!r} (columns {names})")
        for feature in self.features:
            if id_column(feature) not in names:
                raise CacheError(f"id stats: batch has no raw-id column {id_column(feature)!r} "
                                 f"for feature {feature!r}")
        labels = batch.column(self.label).to_numpy(zero_copy_only=False).astype(np.float64)
        flat = [_flatten(batch.column(id_column(f)), labels) for f in self.features]
        pending = self._append(txn, self.features, [ids for ids, _ in flat], [lab for _, lab in flat], [labels])
        if not pending:
            return
        busiest = max(pending, key=pending.get)
        for feature, n in pending.items():
            if feature == busiest and n >= self.compact_after_deltas or n >= 2 * self.compact_after_deltas:
                self.compact(txn, feature)

    def update(self, txn: Any, feature: str, ids: np.ndarray, labels: np.ndarray) -> None:
        """Add one access (with its label) per element of ``ids``: one delta, compacting
        the feature when it has ``compact_after_deltas`` pending."""
        ids = np.asarray(ids, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.float64)
        if ids.shape != labels.shape or ids.ndim != 1:
            raise CacheError(f"id stats: ids and labels of {feature!r} must be equal-length 1-d arrays, "
                             f"got {ids.shape} and {labels.shape}")
        pending = self._append(txn, [feature], [ids], [labels], [labels])
        if pending.get(feature, 0) >= self.compact_after_deltas:
            self.compact(txn, feature)

    def _append(self, txn: Any, features: Sequence[str], ids: Sequence[np.ndarray],
                labels: Sequence[np.ndarray], labels_src: Sequence[np.ndarray]) -> dict[str, int]:
        """Store one delta per feature with ids (all features aggregated in one kernel
        call); returns ``{feature: pending deltas}`` of the features that got one.
        ``labels_src``: the arrays ``labels`` were taken from (checked once for whole
        numbers instead of once per feature)."""
        bounds = np.zeros(len(features) + 1, np.int64)
        np.cumsum([a.size for a in ids], out=bounds[1:])
        cat_ids = np.concatenate(ids) if len(ids) > 1 else np.ascontiguousarray(ids[0], np.int64)
        cat_lab = np.concatenate(labels) if len(labels) > 1 else np.ascontiguousarray(labels[0], np.float64)
        uniq, counts, sums, ub = _hash_segments(cat_ids.astype(np.int64, copy=False), _EMPTY_F,
                                                     cat_lab.astype(np.float64, copy=False), bounds)
        # whole non-negative labels (0/1 clicks) give whole label sums: stored narrow
        sums_integral = all(_integral(lab) for lab in labels_src)
        pending = {}
        for k, feature in enumerate(features):
            lo, hi = ub[k], ub[k + 1]
            if lo == hi:
                continue
            prefix = self._prefix(feature)
            first, nxt = self._state(txn, prefix)
            blob = _encode(_DELTA_MAGIC, _Run(uniq[lo:hi], counts[lo:hi], sums[lo:hi],
                                              bounds[k + 1] - bounds[k], float(sums[lo:hi].sum())), sums_integral)
            if not txn.put(_delta_key(prefix, nxt), blob, db=self.meta_db, overwrite=False):
                raise CacheError(f"id stats: delta {nxt} of {feature!r} already exists (state {first}..{nxt}); "
                                 "the statistics are corrupt: delete the id_stats sub-databases to rebuild them")
            txn.put(prefix + b"s", _STATE.pack(first, nxt + 1), db=self.meta_db)
            pending[feature] = nxt + 1 - first
        return pending

    def compact(self, txn: Any, feature: str) -> dict[str, int]:
        """Fold ``feature``'s pending deltas into its base (evicting into the sketch past
        ``head_capacity``) and delete them. Idempotent; ``read`` returns the same before
        and after. Returns ``{"deltas", "head_ids", "evicted_ids"}``."""
        prefix = self._prefix(feature)
        first, nxt = self._state(txn, prefix)
        if first == nxt:
            return {"deltas": 0, "head_ids": self._base(txn, feature).ids.size, "evicted_ids": 0}
        head, evicted = self._merged(txn, feature, first, nxt)
        txn.put(prefix + b"b", _encode(_BASE_MAGIC, head, _integral(head.sums)), db=self.head_db)
        if evicted is not None:
            sketch = self._sketch(txn, feature, create=True)
            sketch.add(evicted.ids, evicted.counts, evicted.sums)
            txn.put(prefix + b"k", sketch.to_bytes(), db=self.head_db)
        for n in range(first, nxt):
            txn.delete(_delta_key(prefix, n), db=self.meta_db)
        txn.put(prefix + b"s", _STATE.pack(nxt, nxt), db=self.meta_db)
        return {"deltas": nxt - first, "head_ids": int(head.ids.size),
                "evicted_ids": 0 if evicted is None else int(evicted.ids.size)}

    # ------------------------------------------------------------------ reads

    def read(self, txn: Any, feature: str) -> IdStats:
        """The feature's statistics (see the module docstring for what is exact)."""
        first, nxt = self._state(txn, self._prefix(feature))
        head, evicted = self._merged(txn, feature, first, nxt)
        sketch = self._sketch(txn, feature, create=evicted is not None)
        if evicted is not None:
            sketch.add(evicted.ids, evicted.counts, evicted.sums)
        # copies: the arrays may be views of a read transaction's buffers
        ids, counts, sums = head.ids.copy(), head.counts.copy(), head.sums.copy()
        if sketch is not None and ids.size:
            ec, es = sketch.query(ids)
            counts, sums = counts + ec, sums + np.minimum(es, ec)
        return IdStats(ids, counts, sums)

    def summary(self, txn: Any) -> dict[str, dict[str, float]]:
        """Per feature: head ids (what ``read`` lists), events counted, label sum, mass
        evicted to the sketch, deltas pending compaction."""
        out = {}
        for f in self.features:
            first, nxt = self._state(txn, self._prefix(f))
            head, evicted = self._merged(txn, f, first, nxt)
            sketch = self._sketch(txn, f, create=False)
            evicted_events = 0.0 if sketch is None else sketch.total()
            if evicted is not None:
                evicted_events += float(evicted.counts.sum())
            out[f] = {"head_ids": int(head.ids.size), "events": float(head.events),
                      "label_sum": head.label_sum, "evicted_events": evicted_events,
                      "pending_deltas": nxt - first}
        return out

    # ------------------------------------------------------------------ helpers

    def _prefix(self, feature: str) -> bytes:
        prefix = self._prefixes.get(feature)
        return _prefix(feature) if prefix is None else prefix

    def _state(self, txn: Any, prefix: bytes) -> tuple[int, int]:
        raw = txn.get(prefix + b"s", db=self.meta_db)
        if raw is None:
            return 0, 0
        if len(raw) != _STATE.size:
            raise CacheError(f"id stats: state of {prefix[:-1]!r} has {len(raw)} bytes, expected {_STATE.size}")
        first, nxt = _STATE.unpack(raw)
        if first > nxt:
            raise CacheError(f"id stats: state of {prefix[:-1]!r} is corrupt (first {first} > next {nxt})")
        return first, nxt

    def _base(self, txn: Any, feature: str) -> _Run:
        raw = txn.get(self._prefix(feature) + b"b", db=self.head_db)
        if raw is None:
            return _Run(_EMPTY_I, _EMPTY_F, _EMPTY_F)
        return _decode(raw, _BASE_MAGIC, f"base of {feature!r}")

    def _sketch(self, txn: Any, feature: str, *, create: bool) -> CountMinSketch | None:
        """The stored sketch (a copy); when there is none, a fresh one or None."""
        raw = txn.get(self._prefix(feature) + b"k", db=self.head_db)
        if raw is not None:
            return CountMinSketch.from_bytes(raw)
        return CountMinSketch(self.sketch_width, self.sketch_depth) if create else None

    def _merged(self, txn: Any, feature: str, first: int, nxt: int) -> tuple[_Run, _Run | None]:
        """(head, evicted or None): the base with deltas ``first .. nxt - 1`` folded in,
        split at ``head_capacity``."""
        prefix = self._prefix(feature)
        deltas = []
        for n in range(first, nxt):
            raw = txn.get(_delta_key(prefix, n), db=self.meta_db)
            if raw is None:
                raise CacheError(f"id stats: delta {n} of {feature!r} is missing (pending {first}..{nxt - 1}); "
                                 "the statistics are corrupt: delete the id_stats sub-databases to rebuild them")
            deltas.append(_decode(raw, _DELTA_MAGIC, f"delta {n} of {feature!r}"))
        return _evict(_fold(self._base(txn, feature), deltas), self.head_capacity)


def read_id_stats(cache: Any, schema: SchemaConfig, hash_cfg: HashConfig
                  ) -> tuple[dict[str, IdStats], dict[str, dict[str, float]]]:
    """Every sparse feature's ``IdStats`` and ``IdStatsStore.summary``, from one read
    snapshot of ``cache`` (read-only or not): what a mapping fit and a row migration read."""
    store = IdStatsStore.open(cache, schema, hash_cfg)
    with cache.reader() as r:
        return {f: store.read(r.txn, f) for f in store.features}, store.summary(r.txn)
