"""Model-parallel embedding collection: this rank's shards of a ``Plan``, exchanged by all-to-all
and trained by the sparse optimizer exactly as plain training trains the same rows.

``ShardedEmbeddingCollection`` implements the ``trainer.embedding`` interface on each rank
of a process group: ``forward({feature: Jagged})`` takes this rank's ``B`` local samples and
returns their pooled embeddings ``[B, F, D]`` in ``feature_names`` order, exactly what the
plain collection (``trainer.model.fused_embeddings_from_config``) returns for those samples.

Storage: this rank's model-parallel shards live in ``FusedEmbeddingBagCollection``s, one
per distinct shard width (``groups``, one fused "table" per shard), so a step makes one
pooled lookup per group. Replicated (data-parallel) tables live in one more fused
collection (``replicated``). Every row starts from ``trainer.embedding.init_rows`` of its
whole table (the shard's row range and column slice), so a sharded model starts identical
to a plain one. None of them is an ``nn.Parameter``: DDP and the dense optimizer see only
the dense layers.

One step, for model-parallel tables (table-, row-, column-, table-row-wise):

1. *input dist*: each rank sends every shard's owner the ids of its local samples that the
   shard serves (row-split shards: only ids in their row range, rebased to the shard), as
   per-sample lengths + values (``comm.IdExchange``);
2. each owner pools its shards over the ``W x B`` samples, one fused lookup per group;
3. *output dist*: a differentiable all-to-all sends each rank its own ``B`` rows of every
   shard (``comm.pooled_all_to_all``); row-wise partial sums are added, column blocks
   concatenated. Backward reverses the exchange and scales by ``1/W`` so that, with each
   rank's loss the mean over its local batch times ``DistContext.loss_scale``, shard
   gradients equal those of the global batch mean; they arrive in the fused collections'
   backward, which keeps each group's (unique rows, summed gradient).

``sparse_step()`` (after ``backward()``, on every rank: it is collective) then updates:

* model-parallel shards: ``trainer.sharded_optim.apply_shard_update_``, the plain update.
  Row-wise Adagrad of column-wise tables needs the mean of g**2 over the table's full dim:
  every column shard of a table receives the same ids, so all of them hold the same unique
  rows in the same order, and their per-row partial sums of g**2 are all-reduced over a
  process group of the table's owners (``column_groups``, one per column-wise table; see
  ``column_group_ranks``) before the update. Row-split shards see disjoint rows: no exchange.
* replicated tables: plain training updates the rows the global batch touched by their
  summed gradient. Each rank holds the gradient of the rows its local batch touched; it
  all-reduces (``group_pooled``) a dense ``[rows, D + 1]`` buffer of those gradient rows
  plus a touched flag, divides by ``W`` (the loss scaling expects DDP's average), and every
  rank applies the same update to the union of touched rows. Dense rather than a gather of
  sparse rows: a replicated table is small by definition (``data_parallel_max_bytes``), the
  dense sum is one fixed-size collective with a fixed summation order, and the flag keeps
  touched rows whose gradient sums to zero (lazy Adam still moves them) as plain training
  does.
* CACHED tables (``cached_factory``, e.g. ``trainer.cached_embedding``) live on their owner
  in a row-cache collection that pools the exchanged ids like a shard and applies its own
  row optimizer (row-wise Adagrad or SGD, the same update); this collection forwards
  ``sparse_step()`` and ``flush()`` to it.

``step`` counts the updates (Adam's bias correction, the stochastic-rounding counter), the
same on every rank and equal to a plain collection's after as many steps.

Contracts: every rank calls ``forward`` (and ``prefetch``) for every batch in the same order,
with at least one sample (local batch sizes may differ: each id packet carries its sender's
count), and the same features carry weights on every rank; every rank calls
``sparse_step()`` after each backward. ``prefetch(next_sparse)`` posts the next batch's input
dist so that it travels during the current step; the following ``forward`` call must then get
that same dict object. Gradient accumulation is not supported (as in the fused collection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.batch import Jagged
from trainer.comm import IdExchange, pooled_all_to_all
from trainer.config import CommPrecision, ShardingType, SparseOptimizerKind
from trainer.embedding import CollectionCapabilities, TableSpec, init_rows, shared_dim
from trainer.errors import TrainerError
from trainer.fused_embedding import FusedEmbeddingBagCollection
from trainer.planner import Placement, Plan, ShardPlan, TablePlan
from trainer.sharded_optim import PlainCoordinates, apply_shard_update_, row_square_sums
from trainer.sparse_optim import SparseOptimizerSpec, scaled_spec

__all__ = ["ShardedEmbeddingCollection", "ShardView", "shard_key", "column_group_ranks"]

_INIT_CHUNK_ROWS = 1 << 20  # init_rows makes int64 [rows, D] temporaries: bound them


def shard_key(table: str, s: ShardPlan) -> str:
    """Stable name of one shard (no dots: it names a fused table and appears in state keys)."""
    return f"{table}@r{s.row_start}-{s.row_end}_c{s.col_start}-{s.col_end}"


def column_group_ranks(plan: Plan) -> dict[str, list[int]]:
    """Column-wise table -> the ranks owning its column shards (sorted), for tables whose
    shards are on more than one rank: the process groups row-wise Adagrad sums partial
    squares over. In plan order, so that every rank creates the groups in the same order."""
    out = {}
    for tp in plan.tables:
        if tp.sharding is ShardingType.COLUMN_WISE and tp.placement is Placement.DEVICE:
            ranks = sorted({s.rank for s in tp.shards})
            if len(ranks) > 1:
                out[tp.name] = ranks
    return out


def _row_split(tp: TablePlan) -> bool:
    return tp.sharding in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)


@dataclasses.dataclass(frozen=True)
class ShardView:
    """Rows ``[row_start, row_end)`` x columns ``[col_start, col_end)`` of ``table`` held by
    this rank: ``weight`` [rows, cols] (the embedding dtype) and ``state`` (name -> fp32
    optimizer state, [rows] for one value per row, else [rows, cols]), views that write
    through. ``replicated``: a whole data-parallel table (the same on every rank)."""

    table: str
    row_start: int
    row_end: int
    col_start: int
    col_end: int
    weight: torch.Tensor
    state: dict[str, torch.Tensor]
    replicated: bool = False


class ShardedEmbeddingCollection(nn.Module):
    """This rank's part of the plan (see the module docstring).

    ``group_ids`` carries the input dist and ``group_pooled`` the pooled exchange and the
    replicated tables' gradient sum (separate groups, so that a prefetched id exchange and
    DDP's all-reduces never interleave with the pooled all-to-all on one channel).
    ``column_groups``: table -> process group of ``column_group_ranks(plan)[table]``,
    needed under row-wise Adagrad (``trainer.sharding.build_sharded_embeddings`` makes them).
    ``optimizer``/``learning_rate``/``embedding_dtype`` as for ``FusedEmbeddingBagCollection``;
    16-bit rows are rounded with plain training's random bits (``trainer.sharded_optim``).
    """

    capabilities = CollectionCapabilities(sparse_step=True, prefetch=True, flush=True, lr_scale=True)

    def __init__(self, tables: list[TableSpec] | tuple[TableSpec, ...], plan: Plan, rank: int, *,
                 seed: int = 0, group_ids=None, group_pooled=None,
                 column_groups: Mapping[str, Any] | None = None,
                 comm_precision: CommPrecision | None = None, device: torch.device | str = "cpu",
                 optimizer: SparseOptimizerSpec | SparseOptimizerKind | str = SparseOptimizerKind.ROWWISE_ADAGRAD,
                 learning_rate: float = 0.01, embedding_dtype: torch.dtype = torch.float32,
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
        self.seed = int(seed)
        self.group_ids = group_ids
        self.group_pooled = group_pooled
        self.comm_precision = plan.comm_precision if comm_precision is None else comm_precision
        self.device = torch.device(device)
        self.optimizer = (optimizer if isinstance(optimizer, SparseOptimizerSpec) else
                          SparseOptimizerSpec(optimizer, learning_rate))
        self._step_spec = self.optimizer  # the optimizer with set_lr_scale's learning rate
        self._index = {name: i for i, name in enumerate(self.feature_names)}
        self._plans = {tp.name: tp for tp in plan.tables}
        # Each table's first row in plain training's fused buffer (all tables, feature order):
        # 16-bit rows are rounded with the random bits plain training uses for that row.
        self._plain_start: dict[str, int] = {}
        start = 0
        for t in self.tables:
            self._plain_start[t.name] = start
            start += t.rows
        # model-parallel shards owned by each rank, in one canonical order known to all ranks
        self._owned = [[(tp, s) for tp, s in plan.shards_on(r) if tp.model_parallel]
                       for r in range(self.world_size)]
        self._has_model_parallel = any(self._owned)

        mine = self._owned[rank]
        column_groups = dict(column_groups or {})
        needs_sums = self.optimizer.kind is SparseOptimizerKind.ROWWISE_ADAGRAD
        self.column_groups: dict[str, Any] = {}
        for name, ranks in column_group_ranks(plan).items():
            if rank not in ranks or not needs_sums:
                continue
            if name not in column_groups:
                raise TrainerError(
                    f"column-wise table {name!r} trains with row-wise Adagrad, which sums each row's "
                    f"squared gradients over the owners {ranks} of its column shards: pass "
                    "column_groups (trainer.sharding.build_sharded_embeddings creates them)")
            self.column_groups[name] = column_groups[name]
        # column-wise tables this rank holds shards of, in plan order (the all-reduce order)
        self._column_tables = [tp.name for tp in plan.tables if needs_sums
                               and tp.sharding is ShardingType.COLUMN_WISE and tp.placement is Placement.DEVICE
                               and any(t is tp for t, _ in mine)]

        # Model-parallel device shards, one fused collection per width. Shards of an empty
        # row range (more ranks than rows) hold nothing and pool to zeros.
        by_width: dict[int, list[int]] = {}
        for k, (tp, s) in enumerate(mine):
            if tp.placement is Placement.DEVICE and s.rows > 0:
                by_width.setdefault(s.cols, []).append(k)
        self.groups = nn.ModuleDict()
        self._members: dict[str, list[int]] = {}  # group key -> indices into this rank's shards
        self._coords: dict[str, PlainCoordinates] = {}
        for width in sorted(by_width):
            key = f"w{width}"
            members = by_width[width]
            specs = [TableSpec(shard_key(tp.name, s), s.rows, s.cols) for tp, s in (mine[k] for k in members)]
            group = FusedEmbeddingBagCollection(specs, self.seed, optimizer=self.optimizer,
                                                embedding_dtype=embedding_dtype, device=self.device)
            views = group.per_table_weights()
            for k, spec in zip(members, specs):
                tp, s = mine[k]
                _init_shard(views[spec.name], by_name[tp.name], s, self.seed)
            self.groups[key] = group
            self._members[key] = members
            self._coords[key] = self._coordinates(group, [mine[k] for k in members])
        # Replicated tables: whole tables, initialised by the fused constructor itself.
        replicated = [by_name[tp.name] for tp in plan.tables if not tp.model_parallel]
        self.replicated: FusedEmbeddingBagCollection | None = None
        if replicated:
            self.replicated = FusedEmbeddingBagCollection(
                replicated, self.seed, optimizer=self.optimizer, embedding_dtype=embedding_dtype,
                device=self.device)
            self._replicated_coords = self._coordinates(
                self.replicated, [(self._plans[t.name], None) for t in replicated])
        # Cached tables (table-wise, rows on SSD behind a device cache) are collections that
        # update their own rows in sparse_step(); they hold no nn.Parameters either.
        self.cached = nn.ModuleDict()
        for tp, s in mine:
            if tp.placement is Placement.CACHED:
                self.cached[tp.name] = cached_factory(by_name[tp.name])
        # Updates applied so far (mirrored by a host int: sparse_step never reads the device).
        # The groups' own ``step`` buffers are unused: this collection runs their update.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=self.device))
        self._steps = 0
        self._needs_step = False
        self._pending: tuple[int, IdExchange, int] | None = None

    def _coordinates(self, group: FusedEmbeddingBagCollection,
                     shards: list[tuple[TablePlan, ShardPlan | None]]) -> PlainCoordinates:
        plain = [self._plain_start[tp.name] + (s.row_start if s is not None else 0) for tp, s in shards]
        cols = [s.col_start if s is not None else 0 for _, s in shards]
        def as_tensor(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int64, device=self.device)

        return PlainCoordinates(as_tensor(list(group.table_starts)), as_tensor(plain), as_tensor(cols), self.dim)

    # -- the hooks the training loop calls (trainer.loop) -------------------------------
    @torch.no_grad()
    def sparse_step(self) -> None:
        """After ``backward()``: apply the sparse optimizer to the rows the batch touched (a
        collective: column-wise partial sums, the replicated tables' gradient sum); cached
        tables apply their row optimizer. A no-op without a training forward since the
        last call."""
        for m in self.cached.values():
            m.sparse_step()
        if not self._needs_step:
            return
        self._needs_step = False
        self._steps += 1
        self.step.fill_(self._steps)
        pending, squares = {}, {}
        for key, group in self.groups.items():
            pending[key], squares[key] = group.pending_gradient, group.pending_square_sum
            group.discard_gradients()
        row_sq_means = self._column_row_sq_means(pending, squares)
        replicated = self._replicated_gradient()
        for key, group in self.groups.items():
            if pending[key] is None:
                continue
            rows, grad = pending[key]
            apply_shard_update_(self._step_spec, group.weights, group.optimizer_state(), rows, grad,
                                step=self._steps, rounding_seed=self.seed, coords=self._coords[key],
                                row_sq_mean=row_sq_means.get(key),
                                square_sum=None if key in row_sq_means else squares[key])
        if replicated is not None:
            rows, grad, square_sum = replicated
            apply_shard_update_(self._step_spec, self.replicated.weights, self.replicated.optimizer_state(),
                                rows, grad, step=self._steps, rounding_seed=self.seed,
                                coords=self._replicated_coords, square_sum=square_sum)

    def set_lr_scale(self, scale: float) -> None:
        """Update every table (cached ones included) with ``scale`` times the learning rate
        from the next ``sparse_step()`` on (learning-rate warmup)."""
        self._step_spec = scaled_spec(self.optimizer, scale)
        for m in self.cached.values():
            m.set_lr_scale(scale)

    def discard_gradients(self) -> None:
        """Drop the pending gradients of the device shards and replicas without updating
        (a skipped step; every rank must skip it)."""
        for group in self.groups.values():
            group.discard_gradients()
        if self.replicated is not None:
            self.replicated.discard_gradients()
        self._needs_step = False

    def flush(self) -> None:
        """Before a checkpoint: cached tables write their dirty rows and commit."""
        for m in self.cached.values():
            m.flush()

    def _column_row_sq_means(self, pending: dict, squares: dict) -> dict[str, torch.Tensor]:
        """Group key -> [U] mean of g**2 over the full dim for each of its pending rows, for
        the groups of column shards under row-wise Adagrad (collective over the column
        groups, issued in plan order on every rank)."""
        if not self._column_tables:
            return {}
        partial: dict[str, torch.Tensor] = {}
        segments: dict[str, list[str]] = {}  # group key -> table of each shard, in row order
        for key, members in self._members.items():
            if self.groups[key].dim == self.dim:
                continue  # full-width shards: the update takes the mean itself
            p = pending[key]
            if p is None:
                rows = torch.zeros(0, dtype=torch.int64, device=self.device)
                grad = torch.zeros(0, self.groups[key].dim, device=self.device)
            else:
                rows, grad = p
            # rows are sorted and each shard is a contiguous buffer range: cut them by shard
            cuts = torch.searchsorted(rows, self._coords[key].buffer_starts).tolist() + [rows.numel()]
            sums = row_square_sums(grad) if squares[key] is None else squares[key].sum(dim=1)
            segments[key] = []
            for j, k in enumerate(members):
                name = self._owned[self.rank][k][0].name
                part = sums[cuts[j]:cuts[j + 1]]
                partial[name] = part if name not in partial else partial[name] + part
                segments[key].append(name)
        works = []
        for name in self._column_tables:
            group = self.column_groups.get(name)
            # every owner holds the same unique rows (the same ids), so all skip or none
            if group is not None and partial[name].numel():
                partial[name] = partial[name].contiguous()
                works.append(dist.all_reduce(partial[name], group=group, async_op=True))
        for w in works:
            w.wait()
        return {key: torch.cat([partial[name] for name in names]).div_(self.dim)
                for key, names in segments.items()}

    def _replicated_gradient(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(union of the rows the global batch touched, their global-mean gradient, their
        per-lookup squared gradients of the global mean or None) of the replicated tables
        (collective over ``group_pooled`` when there are several ranks)."""
        if self.replicated is None:
            return None
        p, sq = self.replicated.pending_gradient, self.replicated.pending_square_sum
        self.replicated.discard_gradients()
        if self.world_size == 1:
            return None if p is None else (*p, sq)
        dim, w = self.dim, self.world_size
        per_lookup = self.replicated.optimizer.per_lookup
        buf = torch.zeros(self.replicated.total_rows, dim * (2 if per_lookup else 1) + 1, device=self.device)
        if p is not None and p[0].numel():
            rows, grad = p
            flag = torch.ones(rows.numel(), 1, device=self.device)
            buf.index_copy_(0, rows, torch.cat([grad.float(), flag] + ([sq.float()] if per_lookup else []), dim=1))
        dist.all_reduce(buf, group=self.group_pooled)
        touched = buf[:, dim].nonzero().squeeze(1)
        got = buf.index_select(0, touched)
        # a rank's lookups' gradients are 1/W of the global mean's: squares 1/W**2
        return touched, got[:, :dim].div_(w), got[:, dim + 1:].div_(w * w) if per_lookup else None

    @property
    def sparse_steps(self) -> int:
        """Updates applied so far (``step``)."""
        return self._steps

    def set_sparse_steps(self, steps: int) -> None:
        """Set the update count (a checkpoint restores it)."""
        self._steps = int(steps)
        self.step.fill_(self._steps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._steps = int(self.step)

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
        if torch.is_grad_enabled():
            self._needs_step = True
        # every rank knows from the plan whether any table is model-parallel, so all of them
        # skip (or all run) the collectives together
        blocks = self._lookup_and_exchange(exchange, local_b) if self._has_model_parallel else {}
        pooled: list[torch.Tensor | None] = [None] * len(self.feature_names)
        if self.replicated is not None:
            rep = self.replicated({name: sparse[name] for name in self.replicated.feature_names})
            for i, name in enumerate(self.replicated.feature_names):
                pooled[self._index[name]] = rep[:, i]
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
                # as long as the ids (header included) even to a rank that owns no shard
                wts_flat = torch.cat([torch.zeros(head.numel(), device=self.device)]
                                     + [x.to(self.device, torch.float32) for x in wts])
                weights.append(wts_flat)
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
        jags = []
        for k in range(n):
            lens = torch.cat(per_shard_lens[k])
            offsets = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=self.device)
            offsets[1:] = torch.cumsum(lens, 0)
            psw = torch.cat(per_shard_w[k]) if recv_w is not None else None
            jags.append(Jagged(torch.cat(per_shard_vals[k]), offsets, psw))
        pooled: list[torch.Tensor | None] = [None] * n  # [sum b, cols] per shard
        for key, group in self.groups.items():
            members = self._members[key]
            out = group({spec.name: jags[k] for spec, k in zip(group.tables, members)})  # one lookup
            for j, k in enumerate(members):
                pooled[k] = out[:, j, :]
        total_b = sum(src_b)
        for k, (tp, s) in enumerate(mine):
            if tp.placement is Placement.CACHED:
                pooled[k] = self.cached[tp.name]({tp.name: jags[k]})[:, 0, :]
            elif pooled[k] is None:  # an empty row range
                pooled[k] = torch.zeros(total_b, s.cols, device=self.device)
        # send to dest d: its own samples' rows of each of my shards, flattened, in shard order
        outs = [torch.split(p, src_b) for p in pooled]
        if outs:
            send = torch.cat([o[d].reshape(-1) for d in range(W) for o in outs])
        else:
            send = torch.zeros(0, device=self.device)
        if torch.is_grad_enabled() and not send.requires_grad:
            # every rank must take part in the backward exchange, also one with nothing to train
            send = send.detach().requires_grad_()
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

    # -- views for checkpoints and tests --------------------------------------------------
    def shard_views(self) -> list[ShardView]:
        """This rank's device-resident rows: its model-parallel shards (not cached tables,
        not empty row ranges), then the replicated tables."""
        out = []
        mine = self._owned[self.rank]
        for key, group in self.groups.items():
            weights, states = group.per_table_weights(), group.optimizer_state()
            for spec, start, k in zip(group.tables, group.table_starts, self._members[key]):
                tp, s = mine[k]
                out.append(ShardView(tp.name, s.row_start, s.row_end, s.col_start, s.col_end,
                                     weights[spec.name],
                                     {n: t[start:start + spec.rows] for n, t in states.items()}))
        if self.replicated is not None:
            weights, states = self.replicated.per_table_weights(), self.replicated.optimizer_state()
            for spec, start in zip(self.replicated.tables, self.replicated.table_starts):
                out.append(ShardView(spec.name, 0, spec.rows, 0, spec.dim, weights[spec.name],
                                     {n: t[start:start + spec.rows] for n, t in states.items()},
                                     replicated=True))
        return out

    def full_table(self, name: str, state: str | None = None) -> torch.Tensor:
        """The whole table assembled from every rank, fp32 on the CPU (collective over
        ``group_pooled`` unless the table is replicated; for tests, exports and small tables:
        it materialises the table on every rank). ``state``: that optimizer state instead of
        the weights (e.g. ``"state_sum"``: [rows] under row-wise Adagrad, [rows, D] under
        Adagrad)."""
        tp = self._plans[name]
        views = [v for v in self.shard_views() if v.table == name]
        if not tp.model_parallel:
            (v,) = views
            return (v.weight if state is None else v.state[state]).detach().float().cpu().clone()
        mine = [(v.row_start, v.row_end, v.col_start, v.col_end,
                 (v.weight if state is None else v.state[state]).detach().float().cpu())
                for v in views]
        if name in self.cached:
            w, s = self.cached[name].table_rows(name)
            mine.append((0, tp.rows, 0, tp.dim, w if state is None else s[:, 0]))
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group_pooled)
        parts = [p for part in gathered for p in part]
        row_state = state is not None and all(p[4].dim() == 1 for p in parts)
        full = torch.empty(tp.rows) if row_state else torch.empty(tp.rows, tp.dim)
        for r0, r1, c0, c1, t in parts:
            if row_state:
                full[r0:r1] = t  # one value per row: every column shard holds the same
            else:
                full[r0:r1, c0:c1] = t
        return full


def _init_shard(view: torch.Tensor, table: TableSpec, s: ShardPlan, seed: int) -> None:
    """Overwrite a shard's rows with ``init_rows`` of its whole table: rows
    ``[row_start, row_end)``, columns ``[col_start, col_end)`` (the fused constructor
    initialised them as a table of their own name)."""
    with torch.no_grad():
        for lo in range(0, s.rows, _INIT_CHUNK_ROWS):
            hi = min(s.rows, lo + _INIT_CHUNK_ROWS)
            rows = init_rows(table, torch.arange(s.row_start + lo, s.row_start + hi), seed)
            view[lo:hi].copy_(rows[:, s.col_start:s.col_end])
