"""How one process takes part in a training step: alone (``LocalStep``) or as one rank of a
``torchrun`` job (``DistributedStep``). ``trainer.loop.ContinuousTrainer`` is composed from a
strategy and an embedding collection (``trainer.embedding.CollectionCapabilities``); the
loop itself is the same for both.

What a strategy decides (``StepStrategy``):

* ``is_main``: whether this process reports progress and registers the cache reader position;
* ``look_ahead(caps)``: whether the loop reads one batch ahead for the collection's prefetch;
* ``checkpoint_manager(spec, keep)``: plain files, or sharded directories written together;
* ``open_cache(open_writable, open_readonly)``: which process opens the cache how;
* ``bounded_end_seq(cache)``: the last seq a bounded read may reach (None: wherever it ends);
* ``agree_from_main(values)``: rank 0's list of ints on every process (a feed reader's ends);
* ``prepare(item, device)``: the batch this process trains on, or None when every process
  skips the item;
* ``scaled_loss(loss, global_rows)``: the loss whose gradient this process back-propagates;
* ``global_scores(logits, loss, global_rows)``: the whole batch's logits and mean loss;
* ``agree_to_stop(stop_requested, current, upcoming)``: the same answer on every process;
* ``forward_model(model)``: what the step calls for the forward pass (the DDP wrapper);
* ``describe()``: what the run's summary adds.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from storage.batch_cache import BatchCache
from trainer.batch import TrainBatch
from trainer.checkpoint import CheckpointManager, ShardedCheckpointManager
from trainer.config import TrainSpec
from trainer.data import TrainItem
from trainer.dist import DistContext
from trainer.embedding import CollectionCapabilities
from trainer.errors import TrainerError
from trainer.planner import Plan
from trainer.sharding import local_slice, wrap_data_parallel

__all__ = ["StepStrategy", "LocalStep", "DistributedStep"]

# The per-batch agreement vector: what each rank says about the turn.
_STOP, _HAS_CURRENT, _CUR_SEQ, _CUR_ROW, _HAS_UPCOMING, _UP_SEQ, _UP_ROW = range(7)
_AGREE_LEN = 7


class StepStrategy(Protocol):
    """See the module docstring."""

    is_main: bool
    world_size: int  # ranks that share each batch

    def look_ahead(self, caps: CollectionCapabilities) -> bool: ...

    def checkpoint_manager(self, spec: TrainSpec, keep: int) -> CheckpointManager | ShardedCheckpointManager: ...

    def open_cache(self, open_writable: Callable[[], BatchCache],
                   open_readonly: Callable[[], BatchCache], path: str) -> BatchCache: ...

    def bounded_end_seq(self, cache: BatchCache) -> int | None: ...

    def agree_from_main(self, values: list[int]) -> list[int]: ...

    def prepare(self, item: TrainItem, device: torch.device) -> TrainBatch | None: ...

    def scaled_loss(self, loss: torch.Tensor, global_rows: int) -> torch.Tensor: ...

    def global_scores(self, logits: torch.Tensor, loss: torch.Tensor, global_rows: int
                      ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def agree_to_stop(self, stop_requested: bool, current: TrainItem | None,
                      upcoming: TrainItem | None) -> bool: ...

    def forward_model(self, model: nn.Module) -> nn.Module: ...

    def describe(self) -> dict[str, Any]: ...


def _to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    return batch.to(device, non_blocking=device.type == "cuda")


class LocalStep:
    """One process trains every row of every batch."""

    is_main = True
    world_size = 1

    def look_ahead(self, caps: CollectionCapabilities) -> bool:
        return caps.prefetch

    def checkpoint_manager(self, spec: TrainSpec, keep: int) -> CheckpointManager:
        return CheckpointManager(spec.trainer.checkpoint_dir, spec, keep=keep)

    def open_cache(self, open_writable, open_readonly, path: str) -> BatchCache:
        return open_writable()

    def bounded_end_seq(self, cache: BatchCache) -> int | None:
        return None

    def agree_from_main(self, values: list[int]) -> list[int]:
        return list(values)

    def prepare(self, item: TrainItem, device: torch.device) -> TrainBatch:
        return _to_device(item.batch, device)

    def scaled_loss(self, loss: torch.Tensor, global_rows: int) -> torch.Tensor:
        return loss

    def global_scores(self, logits, loss, global_rows):
        return logits, loss

    def agree_to_stop(self, stop_requested: bool, current, upcoming) -> bool:
        return stop_requested

    def forward_model(self, model: nn.Module) -> nn.Module:
        return model

    def describe(self) -> dict[str, Any]:
        return {}


class DistributedStep:
    """One rank of a ``torchrun`` job (``trainer.distributed_loop`` says what differs and why).

    Constructing it is collective when the job has several ranks (a gloo control group for
    the per-batch agreement, so the handshake never waits for an NCCL device queue)."""

    def __init__(self, ctx: DistContext, plan: Plan, *, pipeline: bool):
        if ctx.world_size > 1 and not ctx.initialized:
            raise TrainerError(f"a {ctx.world_size}-rank context without a process group; "
                               "build it with trainer.dist.init_from_env under torchrun")
        self.ctx, self.plan, self.pipeline = ctx, plan, pipeline
        self._control = dist.new_group(backend="gloo") if ctx.initialized and ctx.world_size > 1 \
            else None

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    def look_ahead(self, caps: CollectionCapabilities) -> bool:
        return self.pipeline

    def checkpoint_manager(self, spec: TrainSpec, keep: int) -> ShardedCheckpointManager:
        return ShardedCheckpointManager(spec.trainer.checkpoint_dir, spec, rank=self.ctx.rank, keep=keep)

    def open_cache(self, open_writable, open_readonly, path: str) -> BatchCache:
        # Rank 0 opens writable (it registers the reader position, and in follow mode may
        # create the cache); the others open read-only once it exists. LMDB readers in
        # several processes are fine.
        if self.ctx.rank == 0:
            cache = open_writable()
            self._barrier()
            return cache
        self._barrier()
        if not os.path.isdir(path):
            raise TrainerError(f"rank {self.ctx.rank}: no batch cache at {path!r}; every rank "
                               "must see the cache directory (run the ranks on the cache's host)")
        return open_readonly()

    def bounded_end_seq(self, cache: BatchCache) -> int | None:
        # An empty cache at start gives -1: nothing is read, also on ranks that see batches
        # by the time they read.
        last = 0
        if self.ctx.rank == 0:
            seq = cache.last_seq()
            last = -1 if seq is None else seq
        return self.agree_from_main([last])[0]

    def agree_from_main(self, values: list[int]) -> list[int]:
        """Rank 0's ``values`` on every rank (collective; each rank passes a list of the same
        length)."""
        if self._control is None:
            return list(values)
        box = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(box, src=0, group=self._control)
        return box.tolist()

    def prepare(self, item: TrainItem, device: torch.device) -> TrainBatch | None:
        n = item.batch.batch_size
        if n < self.ctx.world_size:
            return None  # every rank sees the same n, so every rank skips it
        lo, hi = self.ctx.slice_of(n)
        return _to_device(local_slice(item.batch, lo, hi), device)

    def scaled_loss(self, loss: torch.Tensor, global_rows: int) -> torch.Tensor:
        return loss * self.ctx.loss_scale(global_rows)

    def global_scores(self, logits, loss, global_rows):
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

    def agree_to_stop(self, stop_requested: bool, current, upcoming) -> bool:
        mine = [0] * _AGREE_LEN
        mine[_STOP] = int(stop_requested)
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

    def forward_model(self, model: nn.Module) -> nn.Module:
        return wrap_data_parallel(model, self.ctx)  # collective (DDP broadcast)

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.ctx.world_size, "rank": self.ctx.rank,
                "plan": {t.name: t.sharding.value for t in self.plan.tables}}

    def _barrier(self) -> None:
        if self._control is not None:
            dist.barrier(group=self._control)
