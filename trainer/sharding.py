"""Building a sharded DLRM on a process group: the entry points the trainer and CLI use.

Under ``torchrun`` every rank runs (see ``trainer.dist``)::

    ctx = init_from_env(cfg.trainer.device)
    plan = plan_from_config(cfg, ctx.world_size, detect_device_kind())   # same on every rank
    emb = build_sharded_embeddings(cfg, plan, ctx)
    model = wrap_data_parallel(DLRM.from_config(cfg, embeddings=emb).to(ctx.device), ctx)
    opt = build_optimizer(cfg.trainer.dense_optimizer_kind, model.parameters(), cfg.trainer.dense_lr)
    lo, hi = ctx.slice_of(cfg.trainer.batch_size)   # this rank's samples of every batch
    for batch in batches:                             # the same global batches on every rank
        local = local_slice(batch, lo, hi)
        n = batch.batch_size                          # loss: mean over local samples, scaled
        loss = bce(model(local.dense, local.sparse), local.labels) * ctx.loss_scale(n)
        opt.zero_grad(); loss.backward(); opt.step()  # the dense layers (DDP)
        emb.sparse_step()                             # every table's rows (collective)

Gradients then match one process training on the whole batch: DDP averages the dense
layers' gradients, the pooled all-to-all scales shard gradients by ``1/W``, and
``emb.sparse_step()`` (after ``backward()``, on every rank) averages the replicated tables'
gradients and applies ``[trainer] sparse_optimizer`` to every table's touched rows, as plain
training does. Tables the plan puts in the row cache (``Placement.CACHED``, with
``[row_cache] enabled``) are built by ``trainer.cached_embedding`` on their owner; call
``emb.flush()`` before a checkpoint, as the loop does for any collection.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from trainer.batch import Jagged, TrainBatch
from trainer.config import SparseOptimizerKind, TrainSpec
from trainer.dist import DistContext
from trainer.embedding import TableSpec
from trainer.errors import TrainerError
from trainer.model import EMBEDDING_TORCH_DTYPES, tables_from_config
from trainer.planner import Plan
from trainer.sharded_embedding import ShardedEmbeddingCollection, column_group_ranks
from trainer.sparse_optim import SparseOptimizerSpec

__all__ = ["build_sharded_embeddings", "wrap_data_parallel", "local_slice", "find_sharded",
           "find_all_sharded", "measure_table_stats"]


def build_sharded_embeddings(cfg: TrainSpec, plan: Plan, ctx: DistContext,
                             tables: list[TableSpec] | None = None) -> ShardedEmbeddingCollection:
    """This rank's sharded collection for ``plan`` over ``tables`` (default: every sparse
    feature's table; the first-order tables with ``trainer.first_order.first_order_plan``),
    trained by ``[trainer] sparse_optimizer`` at ``sparse_learning_rate`` with rows of
    ``embedding_dtype``. Collective: creates two process groups, then one per column-wise
    table under row-wise Adagrad (in plan order), so every rank must call it at the same
    point."""
    if plan.world_size != ctx.world_size:
        raise TrainerError(f"plan is for {plan.world_size} ranks but the job has {ctx.world_size}")
    t = cfg.trainer
    optimizer = SparseOptimizerSpec(t.sparse_optimizer_kind, t.sparse_lr, accumulator=t.sparse_accumulator)
    column_groups = {}
    if ctx.initialized:
        group_ids = dist.new_group(backend=ctx.backend)
        group_pooled = dist.new_group(backend=ctx.backend)
        if optimizer.kind is SparseOptimizerKind.ROWWISE_ADAGRAD:
            # every rank creates every group, members or not, in the same order
            for name, ranks in column_group_ranks(plan).items():
                column_groups[name] = dist.new_group(ranks=ranks, backend=ctx.backend)
    elif ctx.world_size == 1:
        group_ids = group_pooled = None
        _ensure_single_process_group()
    else:
        raise TrainerError("a multi-rank plan needs an initialised process group (trainer.dist)")
    return ShardedEmbeddingCollection(tables_from_config(cfg) if tables is None else tables, plan,
                                      ctx.rank, seed=t.seed,
                                      group_ids=group_ids, group_pooled=group_pooled,
                                      column_groups=column_groups,
                                      comm_precision=cfg.sharding.comm_precision, device=ctx.device,
                                      optimizer=optimizer,
                                      embedding_dtype=EMBEDDING_TORCH_DTYPES[t.embedding_dtype],
                                      cached_factory=_cached_factory(cfg, ctx.device))


def _cached_factory(cfg: TrainSpec, device: torch.device) -> Callable[[TableSpec], nn.Module]:
    """Builds the row-cache collection of one CACHED table on its owner. Each table gets its
    own store directory, ``row_cache.path/<table>``, so that after a reshard whichever rank
    owns the table opens its store."""

    def build(spec: TableSpec) -> nn.Module:
        from trainer.cached_embedding import build_cached_embeddings

        table_cfg = dataclasses.replace(
            cfg, row_cache=dataclasses.replace(cfg.row_cache, path=os.path.join(cfg.row_cache.path, spec.name)))
        return build_cached_embeddings(table_cfg, [spec], device=device)

    return build


def _ensure_single_process_group() -> None:
    # The collectives need a group even for one rank; a private in-memory store keeps a
    # plain single process free of ports and files.
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def find_sharded(model: nn.Module) -> ShardedEmbeddingCollection | None:
    """The model's first sharded collection (None: none)."""
    for m in model.modules():
        if isinstance(m, ShardedEmbeddingCollection):
            return m
    return None


def find_all_sharded(model: nn.Module) -> dict[str, ShardedEmbeddingCollection]:
    """Every sharded collection of the model by its module path (``embeddings``,
    ``first_order.embeddings``), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ShardedEmbeddingCollection)}


def wrap_data_parallel(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP over the dense layers only: every parameter and buffer of the sharded collections
    (shards, replicated tables, their optimizer state; the first-order rows too) is left out, since each rank holds
    its own shards and ``sparse_step()`` keeps the replicas in step. Returns ``model``
    itself for a single process."""
    if not ctx.initialized or ctx.world_size == 1:
        return model
    own = set()
    for sharded in find_all_sharded(model).values():
        own |= {id(t) for t in sharded.parameters()} | {id(t) for t in sharded.buffers()}
    ignore = {name for name, t in list(model.named_parameters()) + list(model.named_buffers())
              if id(t) in own}
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignore))
    # No device_ids even on CUDA: inputs are already on the device, and with device_ids DDP
    # rebuilds every dict argument on the way in, so the sparse dict would no longer be the
    # object handed to prefetch() (ShardedEmbeddingCollection checks that identity).
    return nn.parallel.DistributedDataParallel(model, device_ids=None)


def local_slice(batch: TrainBatch, start: int, end: int) -> TrainBatch:
    """Samples ``[start, end)`` of a batch (this rank's share; see ``DistContext.slice_of``)."""
    if not 0 <= start <= end <= batch.batch_size:
        raise TrainerError(f"slice [{start}, {end}) outside a batch of {batch.batch_size}")
    sparse = {}
    for name, j in batch.sparse.items():
        lo, hi = int(j.offsets[start]), int(j.offsets[end])
        sparse[name] = Jagged(j.values[lo:hi], j.offsets[start:end + 1] - lo,
                              None if j.weights is None else j.weights[lo:hi])
    return TrainBatch(batch.dense[start:end], sparse, batch.labels[start:end], batch.mapping_version)


def measure_table_stats(batches: Iterable[TrainBatch]) -> dict[str, dict[str, float]]:
    """Per-feature ``pooling_factor`` (mean ids per sample that has any) and
    ``access_frequency`` (fraction of samples with at least one id) over ``batches``, e.g.
    the first batches of the cache; the planner's ``stats`` argument
    (``plan_from_config(cfg, n, device, stats=measure_table_stats(...))``). A feature no
    sample carries gets the smallest allowed frequency rather than 0."""
    ids: dict[str, int] = {}
    present: dict[str, int] = {}
    samples = 0
    for b in batches:
        samples += b.batch_size
        for name, j in b.sparse.items():
            lens = j.offsets[1:] - j.offsets[:-1]
            ids[name] = ids.get(name, 0) + int(lens.sum())
            present[name] = present.get(name, 0) + int((lens > 0).sum())
    if samples == 0:
        raise TrainerError("no samples to measure table statistics from")
    return {name: {"pooling_factor": ids[name] / present[name] if present[name] else 1.0,
                   "access_frequency": max(present[name] / samples, 1e-6)}
            for name in ids}
