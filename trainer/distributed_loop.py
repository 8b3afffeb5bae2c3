"""The continuous trainer on every rank of a ``torchrun`` job: sharded embeddings, DDP dense layers.

``DistributedTrainer`` is ``trainer.loop.ContinuousTrainer`` with the sharded model of
``trainer.sharding``; each rank runs the same loop::

    ctx = init_from_env(cfg.trainer.device)                       # trainer.dist
    trainer = DistributedTrainer(cfg, ctx=ctx, follow=True, stop=stop)
    summary = trainer.run()                                       # the same dict on every rank

What differs from one process, and why:

- *Data*: every rank opens the cache and reads the same training batches in the same order
  (the cursor and batch cutting are deterministic, see ``trainer.data``), then trains on its
  own contiguous slice of each (``DistContext.slice_of``). A batch with fewer rows than ranks
  is skipped by every rank (its rows are reported as ``skipped_rows``). A bounded read
  (``follow=False``) ends at the last cache seq rank 0 saw at start, broadcast to all ranks,
  so that a cache still being written cannot give the ranks different tails.
- *Gradients*: the mean loss over the local slice times ``DistContext.loss_scale`` so that
  DDP's averaging and the sharded exchange give exactly the gradient of the global-batch
  mean; the next batch's ids are prefetched (``[sharding] pipeline``) during the backward.
- *Metrics*: the local logits are all-gathered and the scaled losses all-reduced, so every
  rank updates ``ProgressiveMetrics`` with the whole batch in row order: AUC and logloss are
  the single-process values, and any rank's metrics may be checkpointed.
- *Agreement*: once per batch the ranks exchange (stop requested, what they read) over a
  gloo group (no device sync under NCCL); a stop on any rank stops all of them at the same
  batch, and ranks that read different batches raise ``TrainerError`` instead of training
  on mismatched data. Stop a job by signalling ``torchrun`` (it forwards SIGINT/SIGTERM to
  every rank); a rank that alone waits for new batches in follow mode is not interrupted.
- *Checkpoints*: ``trainer.checkpoint.ShardedCheckpointManager`` on every rank (resharding:
  a checkpoint of any world size or plan resumes here). Only rank 0 registers the cache
  reader position and reports progress.

With one process (no ``torchrun``) and ``[sharding] enabled`` the same trainer runs a
one-rank plan, so its checkpoints resume under ``torchrun`` and back.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from engine.config import HeadraceConfig
from engine.config.sharding import DeviceKind
from engine.errors import ConfigError, TrainerError
from storage.batch_cache import BatchCache
from trainer.batch import TrainBatch
from trainer.checkpoint import ShardedCheckpointManager
from trainer.data import TrainItem
from trainer.dist import DistContext, detect_device_kind
from trainer.loop import ContinuousTrainer
from trainer.planner import Plan, plan_from_config
from trainer.sharding import build_sharded_embeddings, local_slice, wrap_data_parallel

__all__ = ["DistributedTrainer", "plan_for", "require_sharding_for"]

# The per-batch agreement vector: what each rank says about the turn.
_STOP, _HAS_CURRENT, _CUR_SEQ, _CUR_ROW, _HAS_UPCOMING, _UP_SEQ, _UP_ROW = range(7)
_AGREE_LEN = 7


def plan_for(cfg: HeadraceConfig, world_size: int) -> Plan:
    """The plan every rank builds (and ``headrace plan --world-size N --device D`` prints):
    ``[sharding] device``, or this host's device kind when it is ``auto``."""
    device = cfg.sharding.device
    if device is DeviceKind.AUTO:
        device = detect_device_kind()
    return plan_from_config(cfg, world_size, device)


class DistributedTrainer(ContinuousTrainer):
    """``ContinuousTrainer`` for one rank of ``ctx`` (see the module docstring). Constructing
    it is collective (process groups, DDP's parameter broadcast), as are ``run()`` and every
    checkpoint: all ranks must construct and run it together with the same config.

    Keyword arguments are those of ``ContinuousTrainer`` except ``embeddings`` and ``device``
    (the sharded collection and ``ctx.device``); ``on_progress`` is called on rank 0 only.
    """

    def __init__(self, cfg: HeadraceConfig, cache_path: str | os.PathLike[str] | None = None, *,
                 ctx: DistContext, **kwargs: Any):
        for taken in ("embeddings", "device"):
            if taken in kwargs:
                raise TypeError(f"DistributedTrainer builds its own {taken}; do not pass {taken}=")
        if ctx.world_size > 1 and not ctx.initialized:
            raise TrainerError(f"a {ctx.world_size}-rank context without a process group; "
                               "build it with trainer.dist.init_from_env under torchrun")
        self.ctx = ctx
        self.plan = plan_for(cfg, ctx.world_size)
        embeddings = build_sharded_embeddings(cfg, self.plan, ctx)  # collective
        # Stop/agreement exchange on CPU tensors: gloo even when the default group is NCCL,
        # so the per-batch handshake never waits for the device queue.
        self._control = dist.new_group(backend="gloo") if ctx.initialized and ctx.world_size > 1 \
            else None
        super().__init__(cfg, cache_path, embeddings=embeddings, device=ctx.device, **kwargs)
        self.forward_model = wrap_data_parallel(self.model, ctx)  # collective (DDP broadcast)

    # -- hooks of ContinuousTrainer -----------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    def _look_ahead(self) -> bool:
        return self.cfg.sharding.pipeline

    def _checkpoint_manager(self, keep: int) -> ShardedCheckpointManager:
        return ShardedCheckpointManager(self.cfg.trainer.checkpoint_dir, self.cfg, rank=self.ctx.rank,
                                        keep=keep)

    def _open_cache(self) -> BatchCache:
        # Rank 0 opens writable (it registers the reader position, and in follow mode may
        # create the cache); the others open read-only once it exists. LMDB readers in
        # several processes are fine.
        if self.ctx.rank == 0:
            cache = super()._open_cache()
            self._barrier()
            return cache
        self._barrier()
        if not os.path.isdir(self.cache_path):
            raise TrainerError(f"rank {self.ctx.rank}: no batch cache at {self.cache_path!r}; every rank "
                               "must see the cache directory (run the ranks on the cache's host)")
        return BatchCache(self.cache_path, map_size_bytes=self.cfg.cache.map_size_bytes, readonly=True)

    def _bounded_end_seq(self, cache: BatchCache) -> int | None:
        # An empty cache at start gives -1: nothing is read, also on ranks that see batches
        # by the time they read.
        last = 0
        if self.ctx.rank == 0:
            seq = cache.last_seq()
            last = -1 if seq is None else seq
        if self._control is None:
            return last
        box = torch.tensor([last], dtype=torch.int64)
        dist.broadcast(box, src=0, group=self._control)
        return int(box)

    def _prepare(self, item: TrainItem) -> TrainBatch | None:
        n = item.batch.batch_size
        if n < self.ctx.world_size:
            return None  # every rank sees the same n, so every rank skips it
        lo, hi = self.ctx.slice_of(n)
        return local_slice(item.batch, lo, hi).to(self.device, non_blocking=self.device.type == "cuda")

    def _scaled_loss(self, logits: torch.Tensor, labels: torch.Tensor, global_rows: int) -> torch.Tensor:
        return self.loss_fn(logits, labels) * self.ctx.loss_scale(global_rows)

    def _global_scores(self, logits: torch.Tensor, loss: torch.Tensor, global_rows: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        W = self.ctx.world_size
        if W == 1:
            return logits, loss
        # Slices differ by at most one row: pad to the longest, gather, cut each back.
        longest = -(-global_rows // W)
        padded = torch.zeros(longest, dtype=logits.dtype, device=logits.device)
        padded[:logits.numel()] = logits
        parts = [torch.empty_like(padded) for _ in range(W)]
        dist.all_gather(parts, padded)
        base, extra = divmod(global_rows, W)  # DistContext.slice_of's split
        everything = torch.cat([p[:base + (1 if r < extra else 0)] for r, p in enumerate(parts)])
        # sum over ranks of (W * n_r / n) * mean_r = W * global mean
        total = loss.clone()
        dist.all_reduce(total)
        return everything, total / W

    def _agree_to_stop(self, current: TrainItem | None, upcoming: TrainItem | None) -> bool:
        mine = [0] * _AGREE_LEN
        mine[_STOP] = int(self._user_stop())
        if current is not None:
            mine[_HAS_CURRENT], mine[_CUR_SEQ], mine[_CUR_ROW] = 1, current.cursor.seq, current.cursor.row
        if upcoming is not None:
            mine[_HAS_UPCOMING], mine[_UP_SEQ], mine[_UP_ROW] = 1, upcoming.cursor.seq, upcoming.cursor.row
        if self._control is None:
            return bool(mine[_STOP])
        box = [torch.zeros(_AGREE_LEN, dtype=torch.int64) for _ in range(self.ctx.world_size)]
        dist.all_gather(box, torch.tensor(mine, dtype=torch.int64), group=self._control)
        said = torch.stack(box)
        if bool(said[:, _STOP].any()):
            return True
        if not bool((said == said[0]).all()):
            raise TrainerError(
                "ranks read different training batches (per rank: has batch, cursor seq, row, has "
                f"next, next seq, row = {said[:, 1:].tolist()}); every rank must read the same cache "
                "from the same checkpoint cursor with the same trainer.batch_size"
            )
        return False

    # -- the run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """``ContinuousTrainer.run`` on every rank (collective); the summary adds
        ``world_size``, ``rank`` and ``plan`` (table -> sharding type) and is the same on
        every rank but for ``rank`` and timings."""
        out = super().run()
        out.update({
            "world_size": self.ctx.world_size,
            "rank": self.ctx.rank,
            "plan": {t.name: t.sharding.value for t in self.plan.tables},
        })
        return out

    def _barrier(self) -> None:
        if self._control is not None:
            dist.barrier(group=self._control)


def require_sharding_for(cfg: HeadraceConfig, world_size: int) -> None:
    """A multi-rank job trains sharded embeddings; say so clearly when the config does not."""
    if world_size > 1 and not cfg.sharding.enabled:
        raise ConfigError(
            f"headrace train runs under torchrun with {world_size} ranks, which trains sharded "
            "embeddings: set [sharding] enabled = true in the config (see `headrace plan -c CONFIG "
            f"--world-size {world_size}` for the layout), or run one plain process"
        )

