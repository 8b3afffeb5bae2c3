"""Embedding-bag collection whose rows live on SSD (``storage.row_store``) behind a cache of
a fixed number of rows per table on the trainer's device (host memory on CPU).

Same interface as ``trainer.embedding.EmbeddingBagCollection``: ``forward({feature:
Jagged}) -> [B, F, D]``, ``feature_names``, ``dim``. The rows are not ``nn.Parameter``s:

* ``forward`` finds the batch's distinct rows per table, looks them up in the cache, evicts
  (LRU/LFU) to make room and fetches the misses in bulk (from the prefetch when it has
  them). Dirty evicted rows are copied to the host and written back to the store (all
  tables in one ``write_many``) by the next prefetch job in the background, or in line by
  the next call that reads the store. The cache itself (the device tier) is ONE
  ``trainer.fused_embedding.FusedEmbeddingBagCollection`` whose "tables" are the tables'
  cache slots: the batch, translated to slots, is pooled for every feature by one lookup,
  and its backward leaves the gradient of each distinct slot pending (no autograd leaves,
  no per-table kernels).
* ``sparse_step()`` (after ``backward()``) applies the row-wise optimizer to those slots in
  one update, with the state cached beside each row, and marks them dirty.
* ``prefetch(next_sparse)`` starts reading the next batch's missing rows in a background
  thread, after the pending write-backs (one worker, so in that order). Race-free because
  a row's value in the store only changes when the row is evicted, i.e. while it is cached
  or pending write-back; the prefetch reads rows that are NOT cached, after the writes, and
  every call that changes what is cached (``forward``, ``load_checkpoint_state``) or
  touches the store (``flush``, ``table_rows``) first waits for the prefetch. Prefetched
  rows that a later step cached are ignored (the cached copy wins); rows it missed are
  read in line.
* ``flush()`` writes every dirty row and commits a store version; ``checkpoint_state()``
  names that version and ``load_checkpoint_state()`` rolls the store back to it and empties
  the cache, so a checkpoint plus the store is one snapshot and training resumes identically.

Tiers: this device cache over the row store's memory-mapped files on SSD. The host-DRAM
middle tier is the OS page cache over those files (hot pages stay in DRAM, sized by the
kernel to free memory), so no second user-space copy of rows is kept on the host.
Metrics: ``stats`` (cumulative) and ``last_step`` (``RowCacheStats``): hit rate, bytes read
and written, time blocked on the store or the prefetch.

Binding: the first ``forward``/``flush`` without a prior ``load_checkpoint_state`` resets
the store to version 0 (every row at ``init_rows``), so a fresh run never trains on rows an
earlier run left behind.

Not thread-safe: call it from the training thread only.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from storage.row_store import RowStore, RowTableSpec
from trainer.batch import Jagged
from trainer.config import Accumulator, RowCachePolicy, RowOptimizerKind, TrainSpec
from trainer.embedding import CollectionCapabilities, TableSpec, init_rows, shared_dim, table_specs
from trainer.errors import CheckpointError, TrainerConfigError, TrainerError
from trainer.fused_embedding import FusedEmbeddingBagCollection
from trainer.prefetch import RowPrefetcher
from trainer.row_cache_policy import make_policy
from trainer.row_optim import state_dim_of
from trainer.sparse_optim import SparseOptimizerKind, SparseOptimizerSpec

__all__ = ["CachedEmbeddingBagCollection", "RowCacheStats", "open_row_store", "build_cached_embeddings",
           "cached_table_specs", "row_cache_stats"]

_STATE_FORMAT = 1


@dataclasses.dataclass
class RowCacheStats:
    """Counters over all tables; ``CachedEmbeddingBagCollection.stats`` is cumulative and
    ``last_step`` covers the latest ``forward`` (plus ``flush`` write-backs)."""

    lookups: int = 0  # distinct rows looked up (per table per batch)
    hits: int = 0
    bytes_read: int = 0  # from the row store
    bytes_written: int = 0  # to the row store (evictions and flushes)
    store_wait_s: float = 0.0  # forward blocked on store reads/writes or the prefetch
    prefetched_rows: int = 0  # misses served by the background prefetch

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def add(self, other: "RowCacheStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}


def row_cache_stats(module: nn.Module | None) -> RowCacheStats | None:
    """The cumulative ``stats`` of every ``CachedEmbeddingBagCollection`` in ``module`` (itself
    or inside it, e.g. a sharded collection's cached tables on this rank), summed; None when
    it holds none."""
    if module is None:
        return None
    found = [m.stats for m in module.modules() if isinstance(m, CachedEmbeddingBagCollection)]
    if not found:
        return None
    total = RowCacheStats()
    for stats in found:
        total.add(stats)
    return total


def open_row_store(path: str, tables: Sequence[TableSpec], optimizer: RowOptimizerKind,
                   seed: int, *, sync: bool = True) -> RowStore:
    """A row store for ``tables`` whose never-written rows are ``init_rows(table, rows, seed)``."""
    by_name = {t.name: t for t in tables}

    def initializer(table: str, rows: np.ndarray) -> np.ndarray:
        return init_rows(by_name[table], torch.from_numpy(rows), seed).numpy()

    specs = [RowTableSpec(t.name, t.rows, t.dim, state_dim_of(optimizer)) for t in tables]
    return RowStore(path, specs, initializer, sync=sync)


class _TableCache:
    """Cache of one table: ``capacity`` slots of (weights [capacity, D], state [capacity,
    state_dim]) on the device, views into the device tier's buffers; row <-> slot maps and
    dirty bits (a view too) on the host (``row_to_slot`` costs 4 bytes per table row)."""

    def __init__(self, spec: TableSpec, capacity: int, policy: RowCachePolicy,
                 weights: torch.Tensor, state: torch.Tensor, dirty: torch.Tensor):
        self.spec, self.capacity = spec, capacity
        self.weights, self.state, self.dirty = weights, state, dirty
        self.slot_row = torch.full((capacity,), -1, dtype=torch.int64)
        self.row_to_slot = torch.full((spec.rows,), -1, dtype=torch.int32)
        self.policy = make_policy(policy, capacity)

    def clear(self) -> None:
        self.row_to_slot.fill_(-1)
        self.slot_row.fill_(-1)
        self.dirty.zero_()
        self.policy.reset()

    def dirty_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.dirty.nonzero().squeeze(1)
        return slots, self.slot_row.index_select(0, slots)


class CachedEmbeddingBagCollection(nn.Module):
    """Sum-pooled embedding bags over SSD-resident tables with a per-table row cache."""

    capabilities = CollectionCapabilities(sparse_step=True, prefetch=True, flush=True,
                                          own_checkpoint_state=True, lr_scale=True)

    def __init__(self, tables: Sequence[TableSpec], store: RowStore, *,
                 cache_rows: int | Mapping[str, int], policy: RowCachePolicy = RowCachePolicy.LRU,
                 optimizer: RowOptimizerKind = RowOptimizerKind.ROWWISE_ADAGRAD,
                 learning_rate: float = 0.05, eps: float = 1e-8,
                 device: torch.device | str = "cpu", prefetch: bool = True,
                 accumulator: Accumulator = Accumulator.BATCH):
        super().__init__()
        shared_dim(tables)
        state_dim = state_dim_of(optimizer)
        for t in tables:
            stored = store.tables.get(t.name)
            if stored != RowTableSpec(t.name, t.rows, t.dim, state_dim):
                raise ValueError(f"table {t.name!r} ({t.rows} rows, dim {t.dim}, {optimizer.value}) "
                                 f"does not match the row store's {stored}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.tables = tuple(tables)
        self.feature_names = tuple(t.name for t in tables)
        self.dim = tables[0].dim
        self.store = store
        self.optimizer, self.learning_rate, self.eps = optimizer, learning_rate, eps
        self.device = torch.device(device)
        capacities = [min(cache_rows if isinstance(cache_rows, int) else cache_rows[t.name], t.rows)
                      for t in tables]
        # The device tier: every table's slots in one fused buffer (slot s of table t is row
        # s of the tier's "table" t), trained by the same row-wise update. Not a submodule:
        # its buffers are cache contents, checkpointed through the row store (flush), not
        # through state_dict().
        tier = FusedEmbeddingBagCollection(
            [TableSpec(t.name, c, t.dim) for t, c in zip(tables, capacities)],
            optimizer=SparseOptimizerSpec(SparseOptimizerKind(optimizer.value), learning_rate, eps,
                                          accumulator=accumulator),
            device=self.device)
        object.__setattr__(self, "_tier", tier)
        self._dirty = torch.zeros(tier.total_rows, dtype=torch.bool)
        self._caches: dict[str, _TableCache] = {}
        for t, capacity, start in zip(tables, capacities, tier.table_starts):
            end = start + capacity
            state = (tier.state_sum[start:end].unsqueeze(1) if state_dim else
                     torch.zeros(capacity, 0, device=self.device))
            self._caches[t.name] = _TableCache(t, capacity, policy, tier.weights[start:end], state,
                                               self._dirty[start:end])
        self._prefetcher = RowPrefetcher() if prefetch else None
        self._prefetched: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        # Evicted dirty rows not yet in the store: (table, rows, weights, state) on the host.
        self._deferred: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self._bound = False
        self._tick = 0
        self.stats = RowCacheStats()
        self.last_step = RowCacheStats()

    # ------------------------------------------------------------------ training interface
    def forward(self, sparse: dict[str, Jagged]) -> torch.Tensor:
        self._bind()
        if self._tier.pending_gradient is not None:
            raise TrainerError("forward() called again before sparse_step() applied the previous "
                               "batch's embedding gradients; call embeddings.sparse_step() after backward()")
        self._tick += 1
        step = RowCacheStats()
        started = time.perf_counter()
        prefetched = self._take_prefetch()
        self._write_deferred()
        step.store_wait_s += time.perf_counter() - started
        by_slot = {}
        for name in self.feature_names:
            j = sparse[name]
            uniq, inverse = torch.unique(j.values.to("cpu", torch.int64), return_inverse=True)
            slots = self._ensure(name, uniq, None if prefetched is None else prefetched.get(name), step)
            # Each lookup's slot, beside the feature's own offsets and weights.
            by_slot[name] = Jagged(slots.index_select(0, inverse).to(j.offsets.device, non_blocking=True),
                                   j.offsets, j.weights)
        if self._prefetcher is None:
            started = time.perf_counter()
            self._write_deferred()
            step.store_wait_s += time.perf_counter() - started
        self.last_step = step
        self.stats.add(step)
        return self._tier(by_slot)

    @torch.no_grad()
    def sparse_step(self) -> None:
        """Apply the row-wise optimizer to the slots the last ``forward`` looked up, from
        their gradients (none pending: a no-op); marks them dirty."""
        pending = self._tier.pending_gradient
        if pending is None:
            return
        self._tier.sparse_step()
        self._dirty.index_fill_(0, pending[0].cpu(), True)

    def set_lr_scale(self, scale: float) -> None:
        """Update with ``scale`` times ``learning_rate`` from the next ``sparse_step()`` on
        (learning-rate warmup)."""
        self._tier.set_lr_scale(scale)

    def prefetch(self, next_sparse: dict[str, Jagged]) -> None:
        """Start reading the rows of ``next_sparse`` that are not cached, in the background.
        Call it after ``forward`` of the current batch for overlap; harmless anywhere."""
        if self._prefetcher is None:
            return
        self._bind()
        self._prefetcher.take()  # a superseded prefetch: its writes are done, errors raised
        values = {n: next_sparse[n].values.to("cpu", torch.int64) for n in self.feature_names}
        writes, self._deferred = self._deferred, []

        def job():
            if writes:
                self.store.write_many(writes)
            return self._read_missing(values)

        self._prefetcher.submit(job)

    @torch.no_grad()
    def flush(self) -> int:
        """Write every dirty cached row to the store and commit; returns the store version.
        Rows stay cached (now clean)."""
        self._bind()
        step = RowCacheStats()
        started = time.perf_counter()
        self._keep_prefetch()
        for name, cache in self._caches.items():
            slots, rows = cache.dirty_rows()
            self._queue_write_back(name, slots, rows, step)
            cache.dirty.zero_()
        self._write_deferred()
        version = self.store.commit()
        step.store_wait_s += time.perf_counter() - started
        self.last_step.add(step)
        self.stats.add(step)
        return version

    @torch.no_grad()
    def evict_all(self) -> None:
        """Write every dirty cached row to the store without committing (undo-logged like any
        eviction, so a crash rolls it back with the epoch) and empty the cache, dropping any
        prefetched rows: afterwards the store alone holds every row, for a caller that
        rewrites the store's rows (row migration at a mapping-version boundary)."""
        self._bind()
        if self._tier.pending_gradient is not None:
            raise TrainerError("evict_all() with an embedding gradient pending: call sparse_step() first")
        step = RowCacheStats()
        self._keep_prefetch()  # its writes are done; its rows are about to change
        self._prefetched = None
        for name, cache in self._caches.items():
            slots, rows = cache.dirty_rows()
            self._queue_write_back(name, slots, rows, step)
            cache.clear()
        self._write_deferred()
        self.stats.add(step)

    def checkpoint_state(self) -> dict:
        """What a checkpoint must hold to restore these tables: the store and its version.
        Call ``flush()`` first; raises TrainerError when rows changed since."""
        if self._tier.pending_gradient is not None or bool(self._dirty.any()):
            raise TrainerError("cached embeddings changed since the last flush(); call "
                               "embeddings.flush() right before checkpoint_state()")
        return {"format": _STATE_FORMAT, "store_id": self.store.store_id,
                "version": self.store.version, "tick": self._tick}

    def load_checkpoint_state(self, state: Mapping) -> None:
        """Roll the row store back to the checkpoint's version and empty the cache."""
        if state.get("format") != _STATE_FORMAT:
            raise CheckpointError(f"cached-embedding state format {state.get('format')!r}, "
                                  f"expected {_STATE_FORMAT}")
        if state["store_id"] != self.store.store_id:
            raise CheckpointError(
                f"the checkpoint was written with row store {state['store_id']}, but "
                f"{self.store.path} is store {self.store.store_id}; point row_cache.path at the "
                f"store the checkpoint was written with")
        if self._prefetcher is not None:
            self._prefetcher.discard()
        self._prefetched = None
        self._tier.discard_gradients()
        self._deferred = []  # rows changed after the checkpoint: dropped with the rollback
        self.store.restore(int(state["version"]))
        for cache in self._caches.values():
            cache.clear()
        self._tick = int(state["tick"])
        self._bound = True

    def close(self) -> None:
        """Stop the prefetch thread and release the store (unflushed rows are dropped)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
        self.store.close()

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def table_rows(self, name: str, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (weights, state) of ``rows`` of a table (all rows when None), on the CPU:
        the cached copy where cached, else the store's. Does not change the cache."""
        spec = self._caches[name].spec
        rows = torch.arange(spec.rows) if rows is None else rows.to("cpu", torch.int64)
        self._keep_prefetch()
        self._write_deferred()
        w, s = self.store.read(name, rows.numpy())
        weights, state = torch.from_numpy(w), torch.from_numpy(s)
        cache = self._caches[name]
        slots = cache.row_to_slot.index_select(0, rows).long()
        hit = (slots >= 0).nonzero().squeeze(1)
        hit_slots = slots.index_select(0, hit).to(self.device)
        weights.index_copy_(0, hit, cache.weights.index_select(0, hit_slots).cpu())
        state.index_copy_(0, hit, cache.state.index_select(0, hit_slots).cpu())
        return weights, state

    def cache_capacity(self, name: str) -> int:
        return self._caches[name].capacity

    # ------------------------------------------------------------------ internals
    def _bind(self) -> None:
        if not self._bound:
            self.store.restore(0)
            self._bound = True

    def _take_prefetch(self) -> dict | None:
        if self._prefetcher is not None and self._prefetcher.pending:
            self._prefetched = self._prefetcher.take()
        taken, self._prefetched = self._prefetched, None
        return taken

    def _keep_prefetch(self) -> None:
        """Wait for the prefetch but keep its result for the next forward: neither a flush nor
        a read changes which rows are cached, so the prefetched (uncached) rows stay current."""
        if self._prefetcher is not None and self._prefetcher.pending:
            self._prefetched = self._prefetcher.take()

    def _write_deferred(self) -> None:
        """Write evicted rows still on the host (main thread; the prefetch job is done)."""
        writes, self._deferred = self._deferred, []
        if writes:
            self.store.write_many(writes)

    def _read_missing(self, values: dict[str, torch.Tensor]) -> dict:
        """Worker thread: rows of the next batch that are not cached now, read from the store."""
        out = {}
        for name, vals in values.items():
            cache = self._caches[name]
            uniq = torch.unique(vals)
            if len(uniq) and (int(uniq[0]) < 0 or int(uniq[-1]) >= cache.spec.rows):
                continue  # forward reports the bad row with its feature name
            missing = uniq.masked_select(cache.row_to_slot.index_select(0, uniq) < 0)
            w, s = self.store.read(name, missing.numpy())
            w, s = torch.from_numpy(w), torch.from_numpy(s)
            if self.device.type == "cuda":
                w, s = w.pin_memory(), s.pin_memory()
            out[name] = (missing, w, s)
        return out

    def _ensure(self, name: str, uniq: torch.Tensor, prefetched, step: RowCacheStats) -> torch.Tensor:
        """Slots holding rows ``uniq`` (sorted, distinct), fetching and evicting as needed."""
        cache = self._caches[name]
        if len(uniq) and (int(uniq[0]) < 0 or int(uniq[-1]) >= cache.spec.rows):
            bad = int(uniq[0]) if int(uniq[0]) < 0 else int(uniq[-1])
            raise TrainerError(f"feature {name!r}: row {bad} is outside its table of "
                               f"{cache.spec.rows} rows; check schema.sparse rows and the id mapper")
        if len(uniq) > cache.capacity:
            raise TrainerError(
                f"feature {name!r}: one batch uses {len(uniq)} distinct rows but the row cache holds "
                f"{cache.capacity}; raise row_cache.cache_rows/cache_bytes or lower trainer.batch_size")
        # index_* ops throughout: advanced indexing (t[idx]) is 10-100x slower on CPU.
        slots = cache.row_to_slot.index_select(0, uniq).long()
        miss = slots < 0
        miss_at = miss.nonzero().squeeze(1)
        n_miss = len(miss_at)
        step.lookups += len(uniq)
        step.hits += len(uniq) - n_miss
        if n_miss:
            miss_rows = uniq.index_select(0, miss_at)
            pinned = torch.zeros(cache.capacity, dtype=torch.bool)
            pinned.index_fill_(0, slots.masked_select(~miss), True)
            victims = cache.policy.victims(n_miss, pinned)
            started = time.perf_counter()
            old_rows = cache.slot_row.index_select(0, victims)
            occupied = old_rows >= 0
            write = (occupied & cache.dirty.index_select(0, victims)).nonzero().squeeze(1)
            self._queue_write_back(name, victims.index_select(0, write),
                                   old_rows.index_select(0, write), step)
            cache.row_to_slot.index_fill_(0, old_rows.masked_select(occupied), -1)
            weights, state = self._fetch(name, miss_rows, prefetched, step)
            step.store_wait_s += time.perf_counter() - started
            victims_dev = victims.to(self.device)
            cache.weights.index_copy_(0, victims_dev, weights.to(self.device, non_blocking=True))
            cache.state.index_copy_(0, victims_dev, state.to(self.device, non_blocking=True))
            cache.slot_row.index_copy_(0, victims, miss_rows)
            cache.row_to_slot.index_copy_(0, miss_rows, victims.to(torch.int32))
            cache.dirty.index_fill_(0, victims, False)
            cache.policy.on_insert(victims)
            slots.index_copy_(0, miss_at, victims)
        cache.policy.on_access(slots, self._tick)
        return slots

    def _fetch(self, name: str, rows: torch.Tensor, prefetched, step: RowCacheStats):
        """Weights and state of uncached ``rows`` (sorted): prefetched ones, the rest read now."""
        spec = self._caches[name].spec
        weights = torch.empty(len(rows), spec.dim)
        state = torch.empty(len(rows), self._caches[name].state.shape[1])
        have = torch.zeros(len(rows), dtype=torch.bool)
        record_bytes = self.store.tables[name].record_bytes
        if prefetched is not None and len(prefetched[0]):
            p_rows, p_w, p_s = prefetched
            pos = torch.searchsorted(p_rows, rows).clamp_(max=len(p_rows) - 1)
            have = p_rows.index_select(0, pos) == rows
            at = have.nonzero().squeeze(1)
            src = pos.index_select(0, at)
            weights.index_copy_(0, at, p_w.index_select(0, src))
            state.index_copy_(0, at, p_s.index_select(0, src))
            step.prefetched_rows += len(at)
            step.bytes_read += len(at) * record_bytes
        need = (~have).nonzero().squeeze(1)
        if len(need):
            w, s = self.store.read(name, rows.index_select(0, need).numpy())
            weights.index_copy_(0, need, torch.from_numpy(w))
            state.index_copy_(0, need, torch.from_numpy(s))
            step.bytes_read += len(need) * record_bytes
        return weights, state

    def _queue_write_back(self, name: str, slots: torch.Tensor, rows: torch.Tensor,
                          step: RowCacheStats) -> None:
        """Copy dirty ``slots`` (holding ``rows``) to the host for write-back; the copies are
        taken now because the slots are about to be reused."""
        if len(slots) == 0:
            return
        cache = self._caches[name]
        slots_dev = slots.to(self.device)
        weights = cache.weights.index_select(0, slots_dev).cpu().numpy()
        state = cache.state.index_select(0, slots_dev).cpu().numpy()
        if any(table == name for table, *_ in self._deferred):
            self._write_deferred()  # flush after an eviction that no prefetch job wrote yet
        self._deferred.append((name, rows.numpy(), weights, state))
        step.bytes_written += len(rows) * self.store.tables[name].record_bytes


def cached_table_specs(cfg: TrainSpec) -> list[TableSpec]:
    """The tables ``[row_cache]`` puts on SSD: those named in ``row_cache.tables``, or every
    sparse feature when it names none. TrainerConfigError-style ValueError for unknown names."""
    specs = table_specs(cfg.schema, cfg.trainer.embedding_dim)
    if not cfg.row_cache.tables:
        return specs
    known = {t.name for t in specs}
    unknown = [n for n in cfg.row_cache.tables if n not in known]
    if unknown:
        raise ValueError(f"row_cache.tables names {unknown}, which are not [[schema.sparse]] features "
                         f"({sorted(known)})")
    return [t for t in specs if t.name in cfg.row_cache.tables]


def build_cached_embeddings(cfg: TrainSpec, tables: Sequence[TableSpec] | None = None,
                            device: torch.device | str | None = None) -> CachedEmbeddingBagCollection:
    """The SSD-cached collection a config with ``[row_cache] enabled = true`` trains with:
    ``tables`` (default ``cached_table_specs(cfg)``) in ``row_cache.path``, cache sized by
    ``row_cache.cache_rows``/``cache_bytes``, ``trainer.sparse_learning_rate`` and
    ``trainer.seed``. The row cache trains with ``[row_cache] optimizer``, which must be the
    trainer's sparse optimizer (row-wise Adagrad or SGD: the same update as the fused
    tables'); ``TrainerConfigError`` otherwise."""
    rc = cfg.row_cache
    kind = cfg.trainer.sparse_optimizer_kind
    if kind.value not in {k.value for k in RowOptimizerKind}:
        raise TrainerConfigError(
            f"[trainer] sparse_optimizer = {kind.value!r}, but the row cache ([row_cache] enabled) "
            f"trains rows with {[k.value for k in RowOptimizerKind]} only (its [row_cache] optimizer): "
            "set [trainer] sparse_optimizer (or the old [trainer] optimizer key) to one of them, or "
            "disable [row_cache]")
    if rc.optimizer.value != kind.value:
        raise TrainerConfigError(
            f"[row_cache] optimizer = {rc.optimizer.value!r} differs from [trainer] sparse_optimizer = "
            f"{kind.value!r}: cached and in-memory tables must train with the same update; set both "
            "to the same kind")
    tables = list(cached_table_specs(cfg) if tables is None else tables)
    if device is None:
        device = cfg.trainer.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
    store = open_row_store(rc.path, tables, rc.optimizer, cfg.trainer.seed, sync=rc.fsync)
    row_bytes = 4 * (tables[0].dim + state_dim_of(rc.optimizer))
    return CachedEmbeddingBagCollection(
        tables, store, cache_rows=rc.cache_rows_for(row_bytes), policy=rc.policy,
        optimizer=rc.optimizer, learning_rate=cfg.trainer.sparse_lr, eps=rc.adagrad_eps,
        device=device, prefetch=rc.prefetch, accumulator=cfg.trainer.sparse_accumulator)
