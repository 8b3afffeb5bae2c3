"""The continuous trainer: read the batch cache in order, score, train, checkpoint, repeat.

For each training batch (see ``trainer.data`` for how cached batches become training
batches): forward pass with the current parameters, whose detached logits are the batch's
*progressive* scores (taken before the model has seen those labels) and go to
``ProgressiveMetrics``; then the loss's backward pass, the dense optimizer step, and the
embedding collection's ``sparse_step()`` when it has one. Scoring and training share the one
forward pass; with no dropout or batch-norm in the DLRM this is exactly "score, then train".

Model: ``[model] kind`` (``trainer.model.build_model``). Embeddings: ``embeddings`` /
``first_order`` if given; else, for the embedding tables and the first-order part's 1-wide
tables alike (``trainer.first_order``), the SSD-backed ``CachedEmbeddingBagCollection`` when
``[row_cache] enabled``, else the fused plain collection
(``trainer.model.fused_embeddings_from_config``: every table in one buffer, trained by
``[trainer] sparse_optimizer``). The dense torch optimizer sees only ``nn.Parameter``s.
Learning rates warm up and dense gradients are clipped as ``trainer.stability`` says. A
collection whose capabilities include ``prefetch`` gets the next training batch right after
the current forward pass; the loop then reads one batch ahead (in follow mode a batch is
trained once the next one is available, unless ``[trainer] max_batch_wait_ms`` cuts batches
on a timer, when the loop does not read ahead; a stop leaves a read-ahead batch unread for
the next run), and never prefetches across a mapping-version change.

Resume: on start the newest checkpoint in ``trainer.checkpoint_dir`` is restored (model,
optimizer, metrics, counters) and reading resumes at its cursor, so a run stopped after k
batches and resumed produces the same parameters and metrics as an uninterrupted run
(bitwise on CPU, given the same thread count). The cache reader position registered for
retention is the *checkpointed* cursor, so retention never drops a batch the trainer would
need after a crash.

Feeds: with ``[trainer] feeds`` the loop reads the merged Arrow Flight feeds of
``trainer.feed_reader`` in place of the local cache (the same ``iter_batches`` contract, merged
seqs in the cursor) and each checkpoint adds the per-feed cursor (``counters["feed_cursor"]``),
so a resume continues every feed exactly where the checkpointed cursor is; a checkpoint of
one kind never resumes the other.

Stopping: ``stop`` is polled between batches and by the cache reader while it waits for new
batches (follow mode), so the loop ends within the cache's poll interval; a checkpoint is then
written. A non-finite loss raises ``TrainerError`` naming the cache seqs of the batch, without
writing a checkpoint (the last good one stays the newest).

Composition: the loop is built from an embedding collection, whose declared
``capabilities`` (``trainer.embedding.CollectionCapabilities``) say whether it updates its own
rows, prefetches, flushes or checkpoints itself, and a step strategy
(``trainer.step_strategy``): ``LocalStep`` by default, ``DistributedStep`` on every rank of a
``torchrun`` job (``trainer.distributed_loop.DistributedTrainer``). A strategy whose
``prepare`` returns None skips that training batch (its rows count as ``skipped_rows``; only
a multi-rank job does that).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import os
import threading
import time
from typing import Any, Callable

import torch
from torch import nn

from storage.batch_cache import BatchCache
from trainer.batch import TrainBatch
from trainer.batch_ramp import chunk_bounds, ramp_for
from trainer.checkpoint import LoadedCheckpoint
from trainer.config import Precision, TrainSpec
from trainer.data import BatchLayout, Cursor, TimedCuts, TrainingStream, TrainItem
from trainer.device import resolve_device
from trainer.errors import TrainerError
from trainer.embedding import CollectionCapabilities, capabilities_of, collections_of
from trainer.first_order import dense_param_groups, first_order_spec, first_order_tables
from trainer.live_metrics import LiveMetrics
from trainer.metrics import ProgressiveMetrics
from trainer.model import build_model, fused_embeddings_from_config, tables_from_config
from trainer.sharding import local_slice
from trainer.stability import Warmup, clip_dense_gradients
from trainer.step_strategy import LocalStep, StepStrategy
from trainer.optim import build_optimizer, supports_sparse_gradients, use_sparse_gradients

__all__ = ["ContinuousTrainer", "StopReason", "MappingChangeHook", "READER_NAME"]

#: Name under which the trainer registers its cache reader position (for retention).
READER_NAME = "trainer"

#: ``on_mapping_change(old_version, new_version, model, optimizer)``, called before the first
#: batch of a new id-mapping version is trained (to migrate embedding rows).
MappingChangeHook = Callable[[int, int, nn.Module, torch.optim.Optimizer], None]


class StopReason(enum.Enum):
    END_OF_CACHE = "end_of_cache"  # bounded read reached the last cached batch
    STOPPED = "stopped"  # stop() turned true
    MAX_BATCHES = "max_batches"  # this run trained max_batches batches


class ContinuousTrainer:
    """Train a DLRM on the batch cache at ``cache_path``, continuously when ``follow``.

    ``run()`` blocks until the cache is exhausted (``follow=False``), ``stop`` turns true, or
    ``max_batches`` batches were trained in this run; it returns a summary dict
    (``trained_samples``, ``auc``, ``logloss``, ``samples_per_s``, ... see ``run``).
    ``on_progress(dict)`` is called every ``progress_every_batches`` batches, or, when
    ``progress_every_s`` is given, after the first batch and after the first batch that ends
    that many seconds after the previous report, from the training thread. ``live_metrics=False`` skips the step-time and freshness numbers of
    ``trainer.live_metrics`` (kept by default). ``run`` may be called once per instance.
    """

    def __init__(self, cfg: TrainSpec, cache_path: str | os.PathLike[str] | None = None, *,
                 follow: bool = False,
                 stop: Callable[[], bool] | threading.Event | None = None,
                 embeddings: nn.Module | None = None,
                 first_order: nn.Module | None = None,
                 device: str | torch.device | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 on_mapping_change: MappingChangeHook | None = None,
                 progress_every_batches: int = 50,
                 max_batches: int | None = None,
                 keep_checkpoints: int = 3,
                 poll_interval_s: float = 0.05,
                 strategy: StepStrategy | None = None,
                 progress_every_s: float | None = None,
                 live_metrics: bool = True):
        if progress_every_batches < 1:
            raise ValueError(f"progress_every_batches must be >= 1, got {progress_every_batches}")
        if max_batches is not None and max_batches < 0:
            raise ValueError(f"max_batches must be >= 0 or None, got {max_batches}")
        self.cfg = cfg
        self.cache_path = os.fspath(cache_path if cache_path is not None else cfg.cache.path)
        self.follow = follow
        if isinstance(stop, threading.Event):
            self._user_stop: Callable[[], bool] = stop.is_set
        else:
            self._user_stop = stop or (lambda: False)
        self.device = resolve_device(device if device is not None else cfg.trainer.device)
        self.on_progress = on_progress
        self.on_mapping_change = on_mapping_change
        self.progress_every_batches = progress_every_batches
        self.progress_every_s = progress_every_s
        self.max_batches = max_batches
        self.poll_interval_s = poll_interval_s

        t = cfg.trainer
        if embeddings is None and first_order is None:
            embeddings, first_order = _placed_collections(cfg, self.device)
        self.model = build_model(cfg, embeddings, first_order).to(self.device)
        # The embedding collections (rows, and the first-order part's 1-wide rows) the step
        # prefetches, steps and flushes.
        self.collections = list(collections_of(self.model).values())
        if supports_sparse_gradients(t.dense_optimizer_kind):
            # A collection of torch embedding modules passed in (whose parameters the dense
            # optimizer trains) gets sparse gradients; collections that update their own rows
            # (sparse_step) have no such modules and are unaffected.
            for collection in self.collections:
                use_sparse_gradients(collection)
        # The dense optimizer sees only nn.Parameters: fused, cached and sharded tables keep
        # their rows in buffers and update them in sparse_step() with their own optimizer.
        self.optimizer = build_optimizer(t.dense_optimizer_kind, dense_param_groups(self.model, cfg), t.dense_lr)
        self.autocast_dtype = _configure_precision(t.precision, self.device)
        self.metrics = ProgressiveMetrics(cfg.trainer.metrics_window)
        self.live = LiveMetrics(cfg.trainer.metrics_window if live_metrics else None)
        self.strategy: StepStrategy = strategy if strategy is not None else LocalStep()
        self.caps = _joint_capabilities(self.collections)
        # The first-order part is not warmed up (trainer.stability says why).
        self.warmup = Warmup(t.warmup_steps, self.optimizer, [
            c for prefix, c in collections_of(self.model).items() if not prefix.startswith("first_order.")])
        self.ramp = ramp_for(cfg)
        self.checkpoints = self.strategy.checkpoint_manager(cfg, keep_checkpoints)
        self.loss_fn = nn.BCEWithLogitsLoss()
        # Totals since the first run of this checkpoint lineage.
        self.total_batches = 0
        self.total_samples = 0
        self.mapping_version: int | None = None
        self.cursor = Cursor()
        self._pending_reader_seq: dict = {}  # checkpoint path -> its cursor seq, until durable
        self._ran = False
        # [trainer] feeds: the merged feeds read in place of the local cache, and the per-feed
        # cursor the restored checkpoint recorded (trainer.feed_reader).
        self._feeds: Any = None
        self._feed_position: dict | None = None
        # What the step calls for the forward pass: the model itself, or its DDP wrapper
        # (``self.model`` stays the bare DLRM either way).
        self.forward_model: nn.Module = self.strategy.forward_model(self.model)

    @property
    def is_main(self) -> bool:
        """Whether this process reports progress and registers the cache reader position."""
        return self.strategy.is_main

    # -- pieces -------------------------------------------------------------------------

    def _counters(self) -> dict[str, Any]:
        counters = {
            "trained_batches": self.total_batches,
            "trained_samples": self.total_samples,
            "mapping_version": self.mapping_version,
        }
        if self._feeds is not None:
            counters["feed_cursor"] = self._feeds.checkpoint_state(self.cursor.seq)
        return counters

    def _restore(self) -> LoadedCheckpoint | None:
        loaded = self.checkpoints.load(self.model, self.optimizer, self.metrics)
        if loaded is not None:
            self.cursor = loaded.cursor
            self.total_batches = int(loaded.counters["trained_batches"])
            self.total_samples = int(loaded.counters["trained_samples"])
            mv = loaded.counters.get("mapping_version")
            self.mapping_version = None if mv is None else int(mv)
            self._feed_position = loaded.counters.get("feed_cursor")
        return loaded

    def _save(self, cache: BatchCache, background: bool = False) -> str:
        """Checkpoint now (in the background when asked and possible). The cache reader
        position registered for retention moves to this checkpoint's cursor only once the
        checkpoint is durable (``_register_durable``)."""
        for collection in self.collections:
            if capabilities_of(collection).flush:
                collection.flush()
        path = self.checkpoints.save(self.model, self.optimizer, cursor=self.cursor,
                                     metrics=self.metrics, counters=self._counters(),
                                     background=background)
        self._pending_reader_seq[path] = self.cursor.seq
        self._register_durable(cache, self.checkpoints.completed())
        return str(path)

    def _register_durable(self, cache: BatchCache, written: list) -> None:
        """Move the retention reader position to the newest durable checkpoint in ``written``."""
        seqs = [self._pending_reader_seq.pop(p) for p in written if p in self._pending_reader_seq]
        if seqs and self.is_main:
            cache.set_reader_position(READER_NAME, max(seqs))

    def _open_cache(self) -> BatchCache:
        if self.cfg.trainer.feeds:
            return self._open_feeds()
        if self._feed_position is not None:
            raise TrainerError(
                f"the checkpoint in {self.cfg.trainer.checkpoint_dir!r} was written reading feeds "
                f"{self._feed_position['feeds']}; its cursor means nothing in the local cache: set "
                "[trainer] feeds back, or start a new checkpoint_dir")
        return self.strategy.open_cache(self._open_writable, lambda: self._cache_from_config(readonly=True),
                                        self.cache_path)

    def _open_feeds(self) -> Any:
        """The merged ``[trainer] feeds`` (``trainer.feed_reader.FeedReader``), positioned at
        the restored checkpoint's per-feed cursor; a bounded read fixes each feed's end here,
        as rank 0 sees it, on every rank."""
        from trainer.feed_reader import FeedReader, MergePosition

        if self._feed_position is None and self.cursor != Cursor():
            raise TrainerError(
                f"the checkpoint in {self.cfg.trainer.checkpoint_dir!r} was written reading the local cache "
                f"(cursor {self.cursor.to_dict()}); a trainer reading [trainer] feeds cannot resume it: "
                "start a new checkpoint_dir, or empty [trainer] feeds")
        position = None if self._feed_position is None else MergePosition.from_dict(self._feed_position)
        self._feeds = FeedReader.for_trainer(self.cfg.trainer, position)
        if not self.follow:
            self._feeds.fix_ends(self.strategy.agree_from_main)
        return self._feeds

    def _open_writable(self) -> BatchCache:
        # Opened writable because registering the reader position is a (tiny) write; the
        # trainer never writes batches. A missing cache is an error unless following, where
        # the trainer may start before the pipeline has written anything.
        if not self.follow and not os.path.isdir(self.cache_path):
            raise TrainerError(
                f"no batch cache at {self.cache_path!r}; run the pipeline (serve/backfill) first "
                "or point cache.path at an existing cache"
            )
        return self._cache_from_config(readonly=False)

    def _cache_from_config(self, readonly: bool) -> BatchCache:
        """The cache described by ``cfg.cache`` (its durability and size settings) at
        ``self.cache_path``."""
        return BatchCache.from_config(dataclasses.replace(self.cfg.cache, path=self.cache_path),
                                      readonly=readonly)

    def _train_step(self, batch: TrainBatch, upcoming: TrainBatch | None, global_rows: int,
                    share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on ``batch`` (already on the device); returns the (detached) pre-update
        logits and the loss of the whole training batch (``StepStrategy.global_scores``). ``upcoming`` is
        handed to the collections' ``prefetch`` right after the forward pass, so its rows/ids
        travel while this step computes. The gradient is that of ``share`` times the mean
        loss (a ramp chunk's share of its batch, ``_train_batch``). Learning rates follow the
        warmup, dense gradients are clipped (``trainer.stability``)."""
        if not self.model.training:  # train() walks every submodule: ~0.3 ms a step on a CPU
            self.model.train()
        self.warmup.apply(self.total_batches)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            logits = self.forward_model(batch.dense, batch.sparse).float()
        if upcoming is not None:
            for collection in self.collections:
                if capabilities_of(collection).prefetch:
                    collection.prefetch(upcoming.sparse)
        loss = self.strategy.scaled_loss(self.loss_fn(logits, batch.labels), global_rows)
        (loss if share == 1.0 else loss * share).backward()
        clip_dense_gradients(self.model.parameters(), self.cfg.trainer.clip_grad_norm)
        # Sparse embedding gradients are built by autograd itself, so torch's invariant
        # checks would only cost time; opting out explicitly also silences its warning.
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            self.optimizer.step()
        for collection in self.collections:
            if capabilities_of(collection).sparse_step:
                collection.sparse_step()
        return self.strategy.global_scores(logits.detach(), loss.detach(), global_rows)

    def _train_batch(self, item: TrainItem, batch: TrainBatch, upcoming: tuple[TrainItem, TrainBatch] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_train_step`` on the batch, or, while the batch ramp lasts, on consecutive chunks
        of it in order (``trainer.batch_ramp``): the pre-update logits of every chunk in the
        batch's row order, and the batch's mean loss. Each chunk steps with its share of the
        batch's mean loss (rows / batch rows), so a sample moves the model as much in a small
        step as in a whole batch and the Adagrad accumulators do not depend on the ramp: with
        each chunk's own mean loss, the many early steps of small noisy gradients grew the
        accumulators ~(batch / chunk)x and shrank every later step (README "Tuning").
        ``upcoming`` (the next item and its prepared batch) is prefetched by the last step
        only if it will be trained whole: a collection's prefetch is of one whole batch."""
        n = item.batch.batch_size
        world = self.strategy.world_size
        whole_next = upcoming is not None and len(
            chunk_bounds(self.ramp, self.total_samples + n, upcoming[0].batch.batch_size, world)) == 1
        ahead = upcoming[1] if whole_next else None
        bounds = chunk_bounds(self.ramp, self.total_samples, n, world)
        if len(bounds) == 1:
            return self._train_step(batch, ahead, n)
        logits, loss = [], None
        for j, (a, b) in enumerate(bounds):
            chunk = self.strategy.prepare(dataclasses.replace(item, batch=local_slice(item.batch, a, b)), self.device)
            share = (b - a) / n
            part, part_loss = self._train_step(chunk, ahead if j == len(bounds) - 1 else None, b - a, share)
            logits.append(part)
            weighted = part_loss * share
            loss = weighted if loss is None else loss + weighted
        return torch.cat(logits), loss

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train until the end of the cache / stop / max_batches; checkpoint; summarise.

        Returns a dict with ``trained_samples`` / ``trained_batches`` (this run),
        ``total_trained_samples`` / ``total_trained_batches`` (checkpoint lineage), the
        metrics of ``ProgressiveMetrics.summary()`` (``auc``, ``logloss``, ``window_auc``, ...),
        ``samples_per_s``, ``elapsed_s``, ``data_wait_s`` (time blocked on the data stream),
        ``row_cache`` (``RowCacheStats.to_json()``: hit rate, bytes moved; with an SSD row cache),
        ``cursor``, ``stop_reason``, ``device``, ``resumed_from`` and ``checkpoint``.
        """
        if self._ran:
            raise RuntimeError("ContinuousTrainer.run may be called once; build a new trainer")
        self._ran = True
        loaded = self._restore()
        cache = self._open_cache()
        try:
            return self._run(cache, loaded)
        finally:
            # A background checkpoint in flight is finished (or its error raised) before the
            # process goes on: an exit right after run() must not cut it short.
            self.checkpoints.wait()
            cache.close()

    def _run(self, cache: BatchCache, loaded: LoadedCheckpoint | None) -> dict[str, Any]:
        if self.is_main:
            cache.set_reader_position(READER_NAME, self.cursor.seq)
        stopping = threading.Event()
        end_seq = None if self.follow else self.strategy.bounded_end_seq(cache)

        def stop() -> bool:
            return stopping.is_set() or self._user_stop()

        def open_batches(start_seq: int, source_stop: Callable[[], bool]):
            # Copying reads (one memcpy of the stored bytes per cached batch): a zero-copy
            # iterator keeps its read transaction open while suspended, i.e. while the
            # prefetch queue is full, which would pin old pages and stall map growth.
            batches = cache.iter_batches(start_seq, follow=self.follow, stop=source_stop,
                                         poll_interval_s=self.poll_interval_s, zero_copy=False)
            if end_seq is None:
                return batches
            return itertools.takewhile(lambda cb: cb.seq <= end_seq, batches)

        stream = TrainingStream(
            open_batches, BatchLayout.from_config(self.cfg), self.cfg.trainer.batch_size,
            start=self.cursor, prefetch_batches=self.cfg.trainer.prefetch_batches,
            pin_memory=self.device.type == "cuda", stop=stop,
            timed_cuts=TimedCuts.for_trainer(self.cfg.trainer.max_batch_wait_ms, cache, follow=self.follow),
        )
        # On CPU the per-batch sync is free; on CUDA, scores and losses are pulled to the host
        # only every progress interval so the device queue is not drained each step.
        sync_every = 1 if self.device.type == "cpu" else self.progress_every_batches
        pending: list[tuple[TrainItem, torch.Tensor, torch.Tensor]] = []

        def drain() -> None:
            if not pending:
                return
            losses = torch.stack([loss for _, _, loss in pending]).cpu()
            bad = (~torch.isfinite(losses)).nonzero()
            if bad.numel():
                item = pending[int(bad[0])][0]
                raise TrainerError(
                    f"non-finite loss {float(losses[int(bad[0])])} on the training batch from "
                    f"cache seq {item.first_seq} to {item.last_seq} (cursor after it "
                    f"{item.cursor.seq}:{item.cursor.row}); no checkpoint was written for it. "
                    "Lower trainer.learning_rate, or scale large dense features (log1p = true)"
                )
            for done, logits, _ in pending:
                self.metrics.update(logits, done.batch.labels)
            pending.clear()

        run_batches = run_samples = skipped = skipped_rows = 0
        since_save = 0
        last_checkpoint: str | None = None
        data_wait_s = 0.0
        reason = StopReason.END_OF_CACHE
        t0 = time.perf_counter()
        last_progress_t, last_progress_samples = t0, 0
        it = iter(stream)
        look_ahead = self.strategy.look_ahead(self.caps) and stream.look_ahead_ok

        def fetch() -> tuple[TrainItem, TrainBatch | None] | None:
            nonlocal data_wait_s
            w0 = time.perf_counter()
            nxt = next(it, None)
            data_wait_s += time.perf_counter() - w0
            return None if nxt is None else (nxt, self.strategy.prepare(nxt, self.device))

        try:
            current = None
            while True:
                if self.max_batches is not None and run_batches >= self.max_batches:
                    reason = StopReason.MAX_BATCHES
                    break
                # A stop seen before a read skips the read (it could wait for new batches).
                if current is None and not self._user_stop():
                    current = fetch()
                upcoming = fetch() if look_ahead and current is not None and not self._user_stop() \
                    else None
                if self.strategy.agree_to_stop(self._user_stop(), None if current is None else current[0],
                                       None if upcoming is None else upcoming[0]):
                    # Batches read but not trained stay unread: resume reads them again.
                    reason = StopReason.STOPPED
                    break
                if current is None:
                    reason = StopReason.END_OF_CACHE
                    break
                item, batch = current
                current = upcoming
                n = item.batch.batch_size
                skipped += item.skipped_batches
                if batch is None:
                    # Every process skips it alike (see StepStrategy.prepare); its rows count as read.
                    self.cursor = item.cursor
                    skipped_rows += n
                    continue
                version = item.mapping_version
                if self.mapping_version is not None and version != self.mapping_version:
                    if self.on_mapping_change is not None:
                        self.on_mapping_change(self.mapping_version, version, self.model,
                                               self.optimizer)
                # No prefetch across a mapping change: the hook may move rows in between.
                ahead = upcoming if upcoming is not None and upcoming[0].mapping_version == version else None
                step_t0 = time.perf_counter()
                logits, loss = self._train_batch(item, batch, ahead)
                self.live.observe_step(time.perf_counter() - step_t0, item.event_time_ms, time.time())
                pending.append((item, logits, loss))
                self.mapping_version = version
                self.cursor = item.cursor
                run_batches += 1
                run_samples += n
                self.total_batches += 1
                self.total_samples += n
                since_save += 1
                if len(pending) >= sync_every:
                    drain()
                if since_save >= self.cfg.trainer.checkpoint_every_batches:
                    drain()
                    last_checkpoint = self._save(cache, background=self.cfg.trainer.checkpoint_background)
                    since_save = 0
                self._register_durable(cache, self.checkpoints.completed())
                if self.on_progress is not None and self.is_main and (
                        run_batches % self.progress_every_batches == 0 or (
                            self.progress_every_s is not None and (
                                run_batches == 1
                                or time.perf_counter() - last_progress_t >= self.progress_every_s))):
                    drain()
                    now = time.perf_counter()
                    self.on_progress(self._progress(
                        run_samples, now - t0, (run_samples - last_progress_samples)
                        / max(now - last_progress_t, 1e-9), data_wait_s))
                    last_progress_t, last_progress_samples = now, run_samples
        finally:
            stopping.set()
            stream.close()
        drain()
        # The training time ends here: the final checkpoint is reported on its own
        # (final_checkpoint_s), so samples_per_s is the rate of training alone.
        elapsed = time.perf_counter() - t0
        self._register_durable(cache, self.checkpoints.wait())
        if since_save or self.checkpoints.latest() is None:
            last_checkpoint = self._save(cache)
        final_checkpoint_s = time.perf_counter() - t0 - elapsed
        out = self._progress(run_samples, elapsed, run_samples / elapsed if elapsed > 0 else 0.0,
                             data_wait_s)
        out.update({
            "trained_batches": run_batches,
            "stop_reason": reason.value,
            "skipped_cache_batches": skipped,
            "skipped_rows": skipped_rows,
            "device": str(self.device),
            "resumed_from": None if loaded is None else str(loaded.path),
            "checkpoint": last_checkpoint,
            "final_checkpoint_s": final_checkpoint_s,
            **self.strategy.describe(),
        })
        return out

    def _progress(self, run_samples: int, elapsed_s: float, samples_per_s: float,
                  data_wait_s: float) -> dict[str, Any]:
        from trainer.cached_embedding import row_cache_stats

        summary = self.metrics.summary()
        summary.pop("samples", None)
        row_cache = row_cache_stats(self.model)
        if row_cache is not None:  # hit rate and bytes moved of the SSD row cache (this rank's tables)
            summary["row_cache"] = row_cache.to_json()
        return {
            "trained_samples": run_samples,
            "total_trained_samples": self.total_samples,
            "total_trained_batches": self.total_batches,
            "samples_per_s": samples_per_s,
            "elapsed_s": elapsed_s,
            "data_wait_s": data_wait_s,
            "data_wait_fraction": data_wait_s / elapsed_s if elapsed_s > 0 else 0.0,
            "cursor": self.cursor.to_dict(),
            "mapping_version": self.mapping_version,
            **summary,
            **self.live.summary(),
        }


def _placed_collections(cfg: TrainSpec, device: torch.device) -> tuple[nn.Module | None, nn.Module | None]:
    """The embedding collection and the first-order one (``[model]`` says which exist) of a
    single process, built by one factory: SSD row-cached when ``[row_cache] enabled``, else
    fused in memory. The model takes one collection serving every sparse feature, so a row
    cache must hold all of them."""
    if not cfg.schema.sparse:
        return None, None
    if cfg.row_cache.enabled:
        from trainer.cached_embedding import build_cached_embeddings

        names = [s.name for s in cfg.schema.sparse]
        if cfg.row_cache.tables and sorted(cfg.row_cache.tables) != sorted(names):
            raise TrainerError(
                f"row_cache.tables = {list(cfg.row_cache.tables)} caches only some sparse features; "
                f"the continuous trainer needs all of them ({names}) in one collection: leave "
                "row_cache.tables empty (cache every table) or disable [row_cache]"
            )

        def build(spec, tables):
            return build_cached_embeddings(spec, tables, device=device)
    else:
        def build(spec, tables):
            return fused_embeddings_from_config(spec, device, tables)
    embeddings = build(cfg, tables_from_config(cfg)) if cfg.model.has_embeddings else None
    first_order = build(first_order_spec(cfg), first_order_tables(cfg)) if cfg.model.has_first_order else None
    return embeddings, first_order


def _joint_capabilities(collections: list[nn.Module]) -> CollectionCapabilities:
    """What any of ``collections`` does besides ``forward`` (the loop then calls it on those
    that declare it)."""
    caps = [capabilities_of(c) for c in collections]
    return CollectionCapabilities(**{f: any(getattr(c, f) for c in caps)
                                     for f in CollectionCapabilities.__dataclass_fields__})


def _configure_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """Set up ``[trainer] precision`` for ``device``; returns the autocast dtype (None: no
    autocast). ``tf32`` lets CUDA matmuls and convolutions use TF32 tensor cores (a process-
    wide torch setting; on a CPU it changes nothing); ``bf16`` autocasts the MLPs and the
    interaction (embedding lookups and the loss stay fp32 under autocast's rules)."""
    if device.type == "cuda":
        tf32 = precision is Precision.TF32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return torch.bfloat16 if precision is Precision.BF16 else None
