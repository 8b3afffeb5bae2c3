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

from trainer.config import DeviceKind, TrainSpec
from trainer.dist import DistContext, detect_device_kind
from trainer.errors import TrainerConfigError
from trainer.first_order import first_order_plan, first_order_spec, first_order_tables
from trainer.loop import ContinuousTrainer
from trainer.planner import Plan, plan_from_config
from trainer.sharding import build_sharded_embeddings
from trainer.step_strategy import DistributedStep

__all__ = ["DistributedTrainer", "plan_for", "require_sharding_for"]


def plan_for(cfg: TrainSpec, world_size: int) -> Plan:
    """The plan every rank builds (and ``headrace plan --world-size N --device D`` prints):
    ``[sharding] device``, or this host's device kind when it is ``auto``."""
    device = cfg.sharding.device
    if device is DeviceKind.AUTO:
        device = detect_device_kind()
    return plan_from_config(cfg, world_size, device)


class DistributedTrainer(ContinuousTrainer):
    """``ContinuousTrainer`` for one rank of ``ctx``: the sharded collection of
    ``trainer.sharding`` and the ``trainer.step_strategy.DistributedStep`` strategy (see the
    module docstring). Constructing it is collective (process groups, DDP's parameter
    broadcast), as are ``run()`` and every checkpoint: all ranks must construct and run it
    together with the same config.

    The first-order tables (``[model] wide``, or the linear kind) are sharded like the
    embedding tables (``trainer.first_order.first_order_plan``), in a second sharded
    collection. Keyword arguments are those of ``ContinuousTrainer`` except ``embeddings``,
    ``first_order``, ``device`` and ``strategy``; ``on_progress`` is called on rank 0 only. The summary of ``run()`` adds
    ``world_size``, ``rank`` and ``plan`` (table -> sharding type).
    """

    def __init__(self, cfg: TrainSpec, cache_path: str | os.PathLike[str] | None = None, *,
                 ctx: DistContext, **kwargs: Any):
        for taken in ("embeddings", "first_order", "device", "strategy"):
            if taken in kwargs:
                raise TypeError(f"DistributedTrainer builds its own {taken}; do not pass {taken}=")
        self.ctx = ctx
        self.plan = plan_for(cfg, ctx.world_size)
        strategy = DistributedStep(ctx, self.plan, pipeline=cfg.sharding.pipeline)  # collective
        # collective, in this order on every rank
        embeddings = build_sharded_embeddings(cfg, self.plan, ctx) if cfg.model.has_embeddings else None
        first_order = build_sharded_embeddings(
            first_order_spec(cfg), first_order_plan(self.plan), ctx,
            tables=first_order_tables(cfg)) if cfg.model.has_first_order else None
        super().__init__(cfg, cache_path, embeddings=embeddings, first_order=first_order,
                         device=ctx.device, strategy=strategy, **kwargs)


def require_sharding_for(cfg: TrainSpec, world_size: int) -> None:
    """A multi-rank job trains sharded embeddings, and cuts full batches only; say so clearly
    when the config does not."""
    if world_size > 1 and not cfg.sharding.enabled:
        raise TrainerConfigError(
            f"headrace train runs under torchrun with {world_size} ranks, which trains sharded "
            "embeddings: set [sharding] enabled = true in the config (see `headrace plan -c CONFIG "
            f"--world-size {world_size}` for the layout), or run one plain process"
        )
    if world_size > 1 and cfg.trainer.max_batch_wait_ms > 0:
        raise TrainerConfigError(
            f"[trainer] max_batch_wait_ms = {cfg.trainer.max_batch_wait_ms} cuts partial batches by one "
            f"process's clock, but the {world_size} ranks of a torchrun job must cut every batch alike: "
            "set it to 0 for a multi-rank job (serve's single trainer process supports it)"
        )
