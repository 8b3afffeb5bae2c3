"""Per-feature id access statistics kept with the batch cache (for fitting id mappings).

For every sparse feature the store keeps, in two LMDB sub-databases of the cache's
environment:

* ``id_stats.head``: exact ``(count, label_sum)`` per id, for at most ``head_capacity``
  ids per feature. Key = UTF-8 feature name, ``0x00``, the id as 8 big-endian bytes;
  value = two little-endian float64.
* ``id_stats.meta``: per feature the number of head entries, the totals
  ``(events, label_sum)`` and a count-min sketch (``transforms.sketch``) of the mass
  evicted from the head.

Updates run inside the cache's write transaction of each batch (``attach`` registers a
write hook), so the statistics cover exactly the batches committed to the cache: a batch
that is written once is counted once, and a crash loses neither or both.

Bounded memory: when a feature's head outgrows ``head_capacity``, the ids with the lowest
counts (half of the head) are evicted into the sketch. Reading (``read``) returns the head
ids with ``count = head count + sketch estimate`` of mass they may have had evicted
earlier: exact for ids never evicted except for sketch over-estimation (bounded by
``e * evicted_mass / sketch_width`` with high probability); ids only in the sketch are not
listed (the fit treats them as unseen and hashes them into the reserved range).
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import CacheError
from transforms.elements import id_column
from transforms.hash_fit import IdStats
from transforms.sketch import CountMinSketch

__all__ = ["IdStatsStore", "HEAD_DB", "META_DB"]

HEAD_DB = "id_stats.head"
META_DB = "id_stats.meta"
_PAIR = struct.Struct("<dd")
_U64 = struct.Struct("<Q")


def _prefix(feature: str) -> bytes:
    raw = feature.encode()
    if b"\x00" in raw:
        raise CacheError(f"id stats: feature name {feature!r} contains a NUL byte")
    return raw + b"\x00"


def _keys(prefix: bytes, ids: np.ndarray) -> list[bytes]:
    raw = ids.astype(">i8").tobytes()
    return [prefix + raw[i:i + 8] for i in range(0, len(raw), 8)]


def _flatten(column: pa.Array | pa.ChunkedArray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids of one feature and the label of each id's event (list columns are flattened,
    the event label repeated for each value)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
        ids = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        return ids.astype(np.int64, copy=False), np.repeat(labels, lengths)
    if column.null_count:
        keep = column.is_valid().to_numpy(zero_copy_only=False)
        return column.to_numpy(zero_copy_only=False)[keep].astype(np.int64), labels[keep]
    return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), labels


class IdStatsStore:
    """Reads and updates id statistics inside caller-owned LMDB transactions.

    ``head_db`` / ``meta_db`` are LMDB sub-database handles of one environment. All
    methods take the transaction to run in; ``update*`` need a write transaction. Not
    safe for concurrent writers (the cache has one writer).
    """

    def __init__(self, head_db: Any, meta_db: Any, features: Sequence[str], label: str, *,
                 head_capacity: int = 1_000_000, sketch_width: int = 1 << 16, sketch_depth: int = 4):
        if head_capacity < 2:
            raise CacheError(f"id stats: head_capacity must be >= 2, got {head_capacity}")
        self.head_db, self.meta_db = head_db, meta_db
        self.features = tuple(features)
        self.label = label
        self.head_capacity = int(head_capacity)
        self.sketch_width, self.sketch_depth = int(sketch_width), int(sketch_depth)

    @classmethod
    def attach(cls, cache: Any, schema: Any, hash_cfg: Any) -> "IdStatsStore":
        """Open the sub-databases in ``cache`` (a ``storage.batch_cache.BatchCache``) and
        register a write hook so every batch written from now on updates the statistics."""
        store = cls(cache.open_db(HEAD_DB), cache.open_db(META_DB), [s.name for s in schema.sparse],
                    schema.label, head_capacity=hash_cfg.stats_head_capacity,
                    sketch_width=hash_cfg.sketch_width, sketch_depth=hash_cfg.sketch_depth)
        cache.add_write_hook(store.on_write)
        return store

    # ------------------------------------------------------------------ writes

    def on_write(self, txn: Any, pb: Any, seq: int) -> None:
        """Write hook: count the ids of ``pb.batch`` (a ``ProcessedBatch``)."""
        self.update_batch(txn, pb.batch)

    def update_batch(self, txn: Any, batch: pa.RecordBatch) -> None:
        """Count every sparse feature's raw ids of ``batch`` (columns ``<feature>.id`` and
        the label column). A batch without rows changes nothing."""
        if batch.num_rows == 0:
            return
        names = batch.schema.names
        if self.label not in names:
            raise CacheError(f"id stats: batch has no label column {self.label!r} (columns {names})")
        labels = batch.column(self.label).to_numpy(zero_copy_only=False).astype(np.float64)
        for feature in self.features:
            col = id_column(feature)
            if col not in names:
                raise CacheError(f"id stats: batch has no raw-id column {col!r} for feature {feature!r}")
            ids, lab = _flatten(batch.column(col), labels)
            self.update(txn, feature, ids, lab)

    def update(self, txn: Any, feature: str, ids: np.ndarray, labels: np.ndarray) -> None:
        """Add one access (with its label) per element of ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        uniq, inv = np.unique(ids, return_inverse=True)
        counts = np.bincount(inv, minlength=uniq.size).astype(np.float64)
        sums = np.bincount(inv, weights=np.asarray(labels, dtype=np.float64), minlength=uniq.size)
        batch_label_sum = float(sums.sum())
        prefix = _prefix(feature)
        keys = _keys(prefix, uniq)
        cur = txn.cursor(db=self.head_db)
        # vectorised merge: the found entries are decoded in one go and added by position
        # (uniq is sorted, so positions come from a binary search)
        found = cur.getmulti(keys)
        if found:
            n = len(prefix)
            old_ids = np.frombuffer(b"".join(bytes(k)[n:] for k, _ in found), dtype=">i8").astype(np.int64)
            old = np.frombuffer(b"".join(bytes(v) for _, v in found), dtype="<f8").reshape(-1, 2)
            pos = np.searchsorted(uniq, old_ids)
            counts[pos] += old[:, 0]
            sums[pos] += old[:, 1]
        added = uniq.size - len(found)
        packed = np.stack([counts, sums], axis=1).astype("<f8").tobytes()
        cur.putmulti(zip(keys, (packed[i:i + 16] for i in range(0, len(packed), 16))))
        entries = self._get_u64(txn, feature, b"entries") + added
        events, label_sum = self._totals(txn, feature)
        txn.put(prefix + b"totals", _PAIR.pack(events + ids.size, label_sum + batch_label_sum), db=self.meta_db)
        if entries > self.head_capacity:
            entries = self._compact(txn, feature)
        txn.put(prefix + b"entries", _U64.pack(entries), db=self.meta_db)

    def _compact(self, txn: Any, feature: str) -> int:
        """Evict the lower-count half of the head into the sketch; returns entries left."""
        ids, counts, sums = self._scan(txn, feature)
        keep = self.head_capacity // 2
        order = np.lexsort((ids, -counts))  # most frequent first, ties by id
        evict = order[keep:]
        sketch = self._sketch(txn, feature)
        sketch.add(ids[evict], counts[evict], sums[evict])
        prefix = _prefix(feature)
        for k in _keys(prefix, ids[evict]):
            txn.delete(k, db=self.head_db)
        txn.put(prefix + b"sketch", sketch.to_bytes(), db=self.meta_db)
        return int(min(keep, ids.size))

    # ------------------------------------------------------------------ reads

    def read(self, txn: Any, feature: str) -> IdStats:
        """The feature's statistics (see the module docstring for what is exact)."""
        ids, counts, sums = self._scan(txn, feature)
        raw = txn.get(_prefix(feature) + b"sketch", db=self.meta_db)
        if raw is not None and ids.size:
            ec, es = CountMinSketch.from_bytes(raw).query(ids)
            counts, sums = counts + ec, sums + np.minimum(es, ec)
        return IdStats(ids, counts, sums)

    def summary(self, txn: Any) -> dict[str, dict[str, float]]:
        """Per feature: head entries, events counted, label sum, mass evicted to the sketch."""
        out = {}
        for f in self.features:
            events, label_sum = self._totals(txn, f)
            raw = txn.get(_prefix(f) + b"sketch", db=self.meta_db)
            evicted = CountMinSketch.from_bytes(raw).total() if raw is not None else 0.0
            out[f] = {"head_ids": self._get_u64(txn, f, b"entries"), "events": events,
                      "label_sum": label_sum, "evicted_events": evicted}
        return out

    def _scan(self, txn: Any, feature: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prefix = _prefix(feature)
        n = len(prefix)
        keys, vals = [], []
        cur = txn.cursor(db=self.head_db)
        if cur.set_range(prefix):
            for k, v in cur:
                k = bytes(k)
                if not k.startswith(prefix):
                    break
                if len(k) != n + 8:
                    raise CacheError(f"id stats: malformed key {k!r} under feature {feature!r}")
                keys.append(k[n:])
                vals.append(bytes(v))
        if not keys:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        ids = np.frombuffer(b"".join(keys), dtype=">i8").astype(np.int64)
        pairs = np.frombuffer(b"".join(vals), dtype="<f8").reshape(-1, 2)
        return ids, pairs[:, 0].copy(), pairs[:, 1].copy()

    def _sketch(self, txn: Any, feature: str) -> CountMinSketch:
        raw = txn.get(_prefix(feature) + b"sketch", db=self.meta_db)
        if raw is None:
            return CountMinSketch(self.sketch_width, self.sketch_depth)
        return CountMinSketch.from_bytes(raw)

    def _get_u64(self, txn: Any, feature: str, name: bytes) -> int:
        raw = txn.get(_prefix(feature) + name, db=self.meta_db)
        return 0 if raw is None else _U64.unpack(raw)[0]

    def _totals(self, txn: Any, feature: str) -> tuple[float, float]:
        raw = txn.get(_prefix(feature) + b"totals", db=self.meta_db)
        return (0.0, 0.0) if raw is None else _PAIR.unpack(raw)
