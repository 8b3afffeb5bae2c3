"""Model-parallel embedding collection: this rank's shards of a ``Plan``, exchanged by all-to-all.

``ShardedEmbeddingCollection`` implements the ``trainer.embedding`` interface on each rank
of a process group: ``forward({feature: Jagged})`` takes this rank's ``B`` local samples and
returns their pooled embeddings ``[B, F, D]`` in ``feature_names`` order, exactly what a
plain collection holding every table would return for those samples.

One step, for model-parallel tables (table-, row-, column-, table-row-wise):

1. *input dist*: each rank sends every shard's owner the ids of its local samples that the
   shard serves (row-split shards: only ids in their row range, rebased to the shard), as
   per-sample lengths + values (``comm.IdExchange``);
2. each owner pools its shard over the ``W x B`` samples (``embedding_bag``, sum);
3. *output dist*: a differentiable all-to-all sends each rank its own ``B`` rows of every
   shard (``comm.pooled_all_to_all``); row-wise partial sums are added, column blocks
   concatenated. Backward reverses the exchange and scales by ``1/W`` so that, with each
   rank's loss the mean over its local batch, shard gradients equal those of the global
   batch mean (the same convention as DDP's averaging of the dense layers).

A table planned as CACHED lives on its owner in a row-cache collection (``cached_factory``,
e.g. ``trainer.cached_embedding``): it pools the exchanged ids like a shard, and its rows are
updated by ``sparse_step()`` (which this collection forwards, with ``flush()``).

Data-parallel tables are replicated parameters pooled over the local batch; their
gradients are averaged by DDP (``trainer.sharding.wrap_data_parallel`` hands DDP only the
replicated parameters). Every row starts from ``trainer.embedding.init_rows`` wherever it
lives, so a sharded model starts identical to a single-process one.

Contracts: every rank calls ``forward`` (and ``prefetch``) for every batch in the same order,
with at least one sample (local batch sizes may differ: each id packet carries its sender's
count), and the same features carry weights on every rank.
``prefetch(next_sparse)`` posts the next batch's input dist so that it travels during the
current step; the following ``forward`` call must then get that same dict object.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.config.sharding import CommPrecision, ShardingType
from engine.errors import TrainerError
from trainer.batch import Jagged
from trainer.comm import IdExchange, pooled_all_to_all
from trainer.embedding import TableSpec, init_rows, shared_dim
from trainer.planner import Placement, Plan, ShardPlan, TablePlan

__all__ = ["ShardedEmbeddingCollection", "shard_key"]


def shard_key(table: str, s: ShardPlan) -> str:
    """Stable parameter name of one shard (no dots: ``nn.ParameterDict`` keys)."""
    return f"{table}@r{s.row_start}-{s.row_end}_c{s.col_start}-{s.col_end}"


def _row_split(tp: TablePlan) -> bool:
    return tp.sharding in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)


class ShardedEmbeddingCollection(nn.Module):
    """This rank's part of the plan. ``group_ids`` carries the input dist and
    ``group_pooled`` the pooled exchange (separate groups, so that a prefetched id exchange
    and DDP's all-reduces never interleave with the pooled all-to-all on one channel)."""

    def __init__(self, tables: list[TableSpec] | tuple[TableSpec, ...], plan: Plan, rank: int, *,
                 seed: int = 0, group_ids=None, group_pooled=None,
                 comm_precision: CommPrecision | None = None, device: torch.device | str = "cpu",
                 sparse_gradients: bool = False,
                 cached_factory: Callable[[TableSpec], nn.Module] | None = None):
        super().__init__()
        shared_dim(tables, TrainerError)
        by_name = {t.name: t for t in tables}
        if set(by_name) != {t.name for t in plan.tables}:
            raise TrainerError(f"plan tables {sorted(t.name for t in plan.tables)} != collection tables "
                               f"{sorted(by_name)}; re-plan for this config")
        for tp in plan.tables:
            t = by_name[tp.name]
            if (tp.rows, tp.dim) != (t.rows, t.dim):
                raise TrainerError(f"plan has table {tp.name!r} as {tp.rows} x {tp.dim}, the model as "
                                   f"{t.rows} x {t.dim}; re-plan for this config")
            if tp.placement is Placement.CACHED and cached_factory is None:
                raise TrainerError(
                    f"table {tp.name!r} is planned as a cached placement but no cached_factory was "
                    "given (build_sharded_embeddings passes one when [row_cache] is enabled)"
                )
        if not 0 <= rank < plan.world_size:
            raise TrainerError(f"rank {rank} outside the plan's world size {plan.world_size}")
        self.tables = tuple(tables)
        self.plan = plan
        self.rank = rank
        self.world_size = plan.world_size
        self.feature_names = tuple(t.name for t in tables)
        self.dim = tables[0].dim
        self.seed = seed
        self.group_ids = group_ids
        self.group_pooled = group_pooled
        self.comm_precision = plan.comm_precision if comm_precision is None else comm_precision
        self.device = torch.device(device)
        self._index = {name: i for i, name in enumerate(self.feature_names)}
        self._plans = {tp.name: tp for tp in plan.tables}
        # model-parallel shards owned by each rank, in one canonical order known to all ranks
        self._owned = [[(tp, s) for tp, s in plan.shards_on(r) if tp.model_parallel]
                       for r in range(self.world_size)]
        self._has_model_parallel = any(self._owned)
        # Shards may take sparse gradients (Adagrad/SGD update only the rows a batch touched).
        # Replicated tables stay dense: DDP all-reduces them, and NCCL has no sparse all-reduce.
        # Both are plain parameters, not nn.EmbeddingBag modules, so that nothing outside
        # (the loop's use_sparse_gradients) flips them.
        self.sparse_gradients = sparse_gradients
        self.shards = nn.ParameterDict()
        self.replicated = nn.ParameterDict()
        for tp in plan.tables:
            spec = by_name[tp.name]
            if not tp.model_parallel:
                rows = init_rows(spec, torch.arange(spec.rows), seed)
                self.replicated[tp.name] = nn.Parameter(rows.to(self.device))
        # Cached tables (table-wise, rows on SSD behind a device cache) are collections that
        # update their own rows in sparse_step(); they hold no nn.Parameters, so DDP and the
        # torch optimizer never see them.
        self.cached = nn.ModuleDict()
        for tp, s in self._owned[rank]:
            if tp.placement is Placement.CACHED:
                self.cached[tp.name] = cached_factory(by_name[tp.name])
                continue
            rows = init_rows(by_name[tp.name], torch.arange(s.row_start, s.row_end), seed)
            self.shards[shard_key(tp.name, s)] = nn.Parameter(rows[:, s.col_start:s.col_end].contiguous().to(self.device))
        self._pending: tuple[int, IdExchange, int] | None = None

    # -- introspection used by checkpoints and DDP ------------------------------------
    def owned_shards(self) -> list[tuple[TablePlan, ShardPlan, nn.Parameter]]:
        """This rank's model-parallel parameter shards (not cached tables), in canonical order."""
        return [(tp, s, self.shards[shard_key(tp.name, s)]) for tp, s in self._owned[self.rank]
                if tp.placement is Placement.DEVICE]

    # -- the hooks the training loop calls (trainer.loop) -------------------------------
    def sparse_step(self) -> None:
        """After ``backward()``: cached tables apply their row optimizer (a no-op without)."""
        for m in self.cached.values():
            m.sparse_step()

    def flush(self) -> None:
        """Before a checkpoint: cached tables write their dirty rows and commit."""
        for m in self.cached.values():
            m.flush()

    def model_parallel_parameters(self) -> list[nn.Parameter]:
        return [p for _, _, p in self.owned_shards()]

    # -- the step -----------------------------------------------------------------------
    def prefetch(self, sparse: dict[str, Jagged]) -> None:
        """Post the input dist of ``sparse`` now (collective); ``forward(sparse)`` collects it."""
        if self._pending is not None:
            raise TrainerError("prefetch called twice without a forward in between")
        if not self._has_model_parallel:
            return
        self._pending = (id(sparse),) + self._start_input_dist(sparse)

    def forward(self, sparse: dict[str, Jagged]) -> torch.Tensor:
        missing = [n for n in self.feature_names if n not in sparse]
        if missing:
            raise TrainerError(f"batch lacks sparse feature(s) {missing}")
        if self._pending is not None:
            key, exchange, local_b = self._pending
            self._pending = None
            if key != id(sparse):
                raise TrainerError("forward got a different batch than the one prefetched")
        elif self._has_model_parallel:
            exchange, local_b = self._start_input_dist(sparse)
        # every rank knows from the plan whether any table is model-parallel, so all of them
        # skip (or all run) the collectives together
        blocks = self._lookup_and_exchange(exchange, local_b) if self._has_model_parallel else {}
        pooled: list[torch.Tensor | None] = [None] * len(self.feature_names)
        for name, weight in self.replicated.items():
            j = sparse[name]
            pooled[self._index[name]] = F.embedding_bag(j.values, weight, j.offsets[:-1], mode="sum",
                                                        per_sample_weights=j.weights)
        for name, parts in blocks.items():
            tp = self._plans[name]
            if _row_split(tp):
                out = parts[0][1]
                for _, b in parts[1:]:
                    out = out + b
            else:
                out = torch.cat([b for _, b in sorted(parts, key=lambda x: x[0])], dim=1)
            pooled[self._index[name]] = out
        return torch.stack(pooled, dim=1)

    def _start_input_dist(self, sparse: dict[str, Jagged]) -> tuple[IdExchange, int]:
        local_b = None
        for name in self.feature_names:
            b = sparse[name].batch_size
            if local_b is None:
                local_b = b
            elif b != local_b:
                raise TrainerError(f"feature {name!r} has {b} samples, others {local_b}")
        weighted = any(sparse[tp.name].weights is not None for tp, _ in
                       (x for owned in self._owned for x in owned))
        ids, weights = [], []
        for dest in range(self.world_size):
            lengths, values, wts = [], [], []
            for tp, s in self._owned[dest]:
                j = sparse[tp.name]
                v = j.values
                counts = j.offsets[1:] - j.offsets[:-1]
                w = j.weights
                if _row_split(tp):
                    keep = (v >= s.row_start) & (v < s.row_end)
                    sample = torch.repeat_interleave(torch.arange(local_b, device=v.device), counts)
                    counts = torch.bincount(sample[keep], minlength=local_b)
                    v = v[keep] - s.row_start
                    w = None if w is None else w[keep]
                lengths.append(counts.to(torch.int64))
                values.append(v.to(torch.int64))
                if weighted:
                    wts.append(w if w is not None else torch.ones(v.numel(), device=v.device))
            # header: this rank's sample count (ranks may hold unequal slices), then lengths
            head = torch.cat([torch.tensor([local_b], dtype=torch.int64, device=self.device)]
                             + [x.to(self.device) for x in lengths])
            ids.append(torch.cat([head] + [x.to(self.device) for x in values]))
            if weighted:
                wts_flat = torch.cat([torch.zeros(head.numel(), device=self.device)] + wts) if wts else \
                    torch.empty(0, device=self.device)
                weights.append(wts_flat.to(self.device, torch.float32))
        exchange = IdExchange(self.group_ids, self.world_size, self.device).start(ids, weights if weighted else None)
        return exchange, local_b

    def _lookup_and_exchange(self, exchange: IdExchange, local_b: int) -> dict[str, list[tuple[int, torch.Tensor]]]:
        W = self.world_size
        recv_ids, recv_w = exchange.wait()
        mine = self._owned[self.rank]
        n = len(mine)
        # per source: [its sample count b, lengths [n, b], values per shard]
        per_shard_vals: list[list[torch.Tensor]] = [[] for _ in range(n)]
        per_shard_lens: list[list[torch.Tensor]] = [[] for _ in range(n)]
        per_shard_w: list[list[torch.Tensor]] = [[] for _ in range(n)]
        src_b = [int(buf[0]) for buf in recv_ids]
        for src in range(W):
            buf, b = recv_ids[src], src_b[src]
            head = 1 + n * b
            lens = buf[1:head].view(n, b)
            sizes = lens.sum(dim=1).tolist()
            vals = torch.split(buf[head:], sizes)
            wsplit = None if recv_w is None else torch.split(recv_w[src][head:], sizes)
            for k in range(n):
                per_shard_lens[k].append(lens[k])
                per_shard_vals[k].append(vals[k])
                if wsplit is not None:
                    per_shard_w[k].append(wsplit[k])
        outs = []
        for k, (tp, s) in enumerate(mine):
            lens = torch.cat(per_shard_lens[k])
            offsets = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=self.device)
            offsets[1:] = torch.cumsum(lens, 0)
            psw = torch.cat(per_shard_w[k]) if recv_w is not None else None
            vals = torch.cat(per_shard_vals[k])
            if tp.placement is Placement.CACHED:
                pooled = self.cached[tp.name]({tp.name: Jagged(vals, offsets, psw)})[:, 0, :]
            else:
                pooled = F.embedding_bag(vals, self.shards[shard_key(tp.name, s)], offsets[:-1], mode="sum",
                                         per_sample_weights=psw, sparse=self.sparse_gradients)  # [sum b, cols]
            outs.append(torch.split(pooled, src_b))
        # send to dest d: its own samples' rows of each of my shards, flattened, in shard order
        if outs:
            send = torch.cat([o[d].reshape(-1) for d in range(W) for o in outs])
        else:
            send = torch.zeros(0, device=self.device, requires_grad=True)
        send_splits = [src_b[d] * sum(s.cols for _, s in mine) for d in range(W)]
        recv_splits = [sum(local_b * s.cols for _, s in self._owned[src]) for src in range(W)]
        got = pooled_all_to_all(send, send_splits, recv_splits, self.group_pooled,
                                self.comm_precision, grad_scale=1.0 / W)
        blocks: dict[str, list[tuple[int, torch.Tensor]]] = {}
        pos = 0
        for src in range(W):
            for tp, s in self._owned[src]:
                size = local_b * s.cols
                blocks.setdefault(tp.name, []).append((s.col_start, got[pos:pos + size].view(local_b, s.cols)))
                pos += size
        return blocks

    def full_table(self, name: str) -> torch.Tensor:
        """The whole table assembled from every rank (collective over ``group_pooled``;
        for tests, exports and small tables: it materialises the table on every rank)."""
        tp = self._plans[name]
        if not tp.model_parallel:
            return self.replicated[name].detach().cpu().clone()
        mine = [(s.row_start, s.row_end, s.col_start, s.col_end, p.detach().cpu())
                for t, s, p in self.owned_shards() if t.name == name]
        if name in self.cached:
            mine.append((0, tp.rows, 0, tp.dim, self.cached[name].table_rows(name)[0]))
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group_pooled)
        full = torch.empty(tp.rows, tp.dim)
        for part in gathered:
            for r0, r1, c0, c1, w in part:
                full[r0:r1, c0:c1] = w
        return full
