"""Row migration of a ``ShardedEmbeddingCollection``: each rank migrates what it holds, and
the rows that land on another rank's shard travel in one all-to-all.

The rule is the plain one (``trainer.migrate``); this module splits it over the plan:

* **Model-parallel device shards** (table-, row-, column-, table-row-wise). A shard is a
  block of its table (rows ``[row_start, row_end)``, columns ``[col_start, col_end)``).
  Its owner computes the block's partial sums (``trainer.migrate_rows.partial_sums``: per
  new row, the weighted values of the ids whose old rows it holds) and sends each
  destination shard, of the same table, the new rows in that shard's row range and the
  columns the two share. Every rank knows from the plan which (source, destination) shard
  pairs exist and in which order, so the sends to all ranks go in ONE
  ``all_to_all_single`` of float64 (after a tiny exchange of the sizes, which also checks
  that every rank migrates with the same statistics). Each destination adds what it got,
  computes its rows' member weights and writes the new rows and optimizer state into its
  shard (``finish``). Row-wise tables exchange between all their owners; column- and
  table-wise shards only with themselves.
* **Optimizer state** travels with the rows: element-wise state (Adagrad, Adam) as columns
  beside the weights; row-wise Adagrad's one value per row from the source shard holding
  the destination's first column (every column shard holds the same value).
* **Replicated** (data-parallel) tables: every rank migrates its whole copy the plain way,
  on identical inputs, so the replicas stay identical without communication.
* **Cached** tables (rows on SSD on their owner): ``trainer.migrate_row_cache`` on the owner.

The result equals the plain single-process migration up to float64 summation order (the
tests check 1e-5 on fp32 rows). Collective over the collection's ``group_pooled``: every
rank calls it with the same features, mappings and statistics, between steps.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

from trainer.errors import TrainerError
from trainer.migrate_row_cache import migrate_row_cache
from trainer.migrate_rows import (
    MigrationInputs,
    PartialSums,
    TensorBlock,
    finish,
    member_weights,
    migrate_block,
    partial_sums,
)
from trainer.planner import Placement, ShardPlan
from trainer.sharded_embedding import ShardedEmbeddingCollection, ShardView
from trainer.sparse_optim import state_shapes

__all__ = ["migrate_sharded"]


@dataclasses.dataclass(frozen=True)
class _Pair:
    """What shard ``source`` of ``table`` sends its shard ``dest``: value columns ``src_cols``
    of the source's layout, landing in columns ``dest_cols`` of the destination's."""

    table: str
    source: ShardPlan
    dest: ShardPlan
    src_cols: torch.Tensor
    dest_cols: torch.Tensor


def _key(table: str, s: ShardPlan | ShardView) -> tuple:
    return (table, s.row_start, s.row_end, s.col_start, s.col_end)


def _state_per_row(collection: ShardedEmbeddingCollection) -> list[tuple[str, bool]]:
    """The optimizer's state tensors in layout order, and whether each is one value per row."""
    return [(name, len(shape) == 1) for name, shape in state_shapes(collection.optimizer.kind, 1, 2).items()]


def _pair(table: str, source: ShardPlan, dest: ShardPlan, states: list[tuple[str, bool]], device
          ) -> _Pair | None:
    """The columns ``source`` sends ``dest`` (a shard's layout: its weight columns, then each
    state: one column per row-wise state, else its columns); None when they share none."""
    lo, hi = max(source.col_start, dest.col_start), min(source.col_end, dest.col_end)
    if lo >= hi:
        return None
    src = list(range(lo - source.col_start, hi - source.col_start))
    dst = list(range(lo - dest.col_start, hi - dest.col_start))
    s_off, d_off = source.cols, dest.cols
    for _, per_row in states:
        if per_row:
            if source.col_start <= dest.col_start < source.col_end:
                src.append(s_off)
                dst.append(d_off)
            s_off, d_off = s_off + 1, d_off + 1
        else:
            src += range(s_off + lo - source.col_start, s_off + hi - source.col_start)
            dst += range(d_off + lo - dest.col_start, d_off + hi - dest.col_start)
            s_off, d_off = s_off + source.cols, d_off + dest.cols
    return _Pair(table, source, dest, torch.tensor(src, dtype=torch.int64, device=device),
                 torch.tensor(dst, dtype=torch.int64, device=device))


def _pairs(collection: ShardedEmbeddingCollection, tables: list[str]) -> list[_Pair]:
    """Every (source, destination) shard pair of the migrating device tables, in one order
    all ranks agree on (plan order of tables, then destination, then source shard)."""
    states = _state_per_row(collection)
    out = []
    for tp in collection.plan.tables:
        if tp.name not in tables or not tp.model_parallel or tp.placement is not Placement.DEVICE:
            continue
        shards = [s for s in tp.shards if s.rows > 0]
        for dest in shards:
            for source in shards:
                p = _pair(tp.name, source, dest, states, collection.device)
                if p is not None:
                    out.append(p)
    return out


def _block(view: ShardView, states: list[tuple[str, bool]]) -> TensorBlock:
    return TensorBlock([view.weight] + [view.state[name] for name, _ in states])


def _fingerprint(jobs: Mapping[str, MigrationInputs]) -> int:
    """A checksum of the features and statistics a rank migrates with (all ranks must agree)."""
    crc = 0
    for feature in sorted(jobs):
        inputs = jobs[feature]
        crc = zlib.crc32(feature.encode(), crc)
        crc = zlib.crc32(inputs.ids.tobytes(), crc)
        crc = zlib.crc32(inputs.weights.numpy().tobytes(), crc)
    return crc


def _exchange(collection: ShardedEmbeddingCollection, send: list[list[torch.Tensor]], fingerprint: int
              ) -> list[torch.Tensor]:
    """Send ``send[d]`` (float64 pieces) to each rank d; returns what each rank sent here."""
    W, device = collection.world_size, collection.device
    flat = [torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device) for parts in send]
    if W == 1:
        return flat
    sizes = torch.tensor([[f.numel(), fingerprint] for f in flat], dtype=torch.int64, device=device)
    got = torch.empty_like(sizes)
    dist.all_to_all_single(got, sizes, group=collection.group_pooled)
    got = got.cpu()
    if bool((got[:, 1] != fingerprint).any()):
        raise TrainerError(
            f"row migration on rank {collection.rank}: the ranks migrate with different id statistics "
            f"(fingerprints {got[:, 1].tolist()}); every rank must load the statistics pinned to the "
            "mapping version (engine.fit_hash.migration_hook)")
    recv_sizes = got[:, 0].tolist()
    send_sizes = [f.numel() for f in flat]
    out = torch.empty(sum(recv_sizes), dtype=torch.float64, device=device)
    dist.all_to_all_single(out, torch.cat(flat), recv_sizes, send_sizes, group=collection.group_pooled)
    return list(torch.split(out, recv_sizes))


def _packet(p: PartialSums, pair: _Pair) -> torch.Tensor:
    """[k, k rows (relative to the destination), k x c values, c glob] as float64."""
    rel, sums = p.within(pair.dest.row_start, pair.dest.row_end)
    k = rel.numel()
    head = torch.tensor([float(k)], dtype=torch.float64, device=sums.device)
    return torch.cat([head, rel.to(torch.float64), sums.index_select(1, pair.src_cols).reshape(-1),
                      p.glob.index_select(0, pair.src_cols)])


@torch.no_grad()
def migrate_sharded(collection: ShardedEmbeddingCollection, jobs: Mapping[str, MigrationInputs]) -> None:
    """Migrate the tables named in ``jobs`` (table -> its change and ids) wherever this
    rank holds them (see the module docstring). Collective."""
    plans = {tp.name: tp for tp in collection.plan.tables}
    for table, inputs in jobs.items():
        tp = plans[table]
        if not tp.rows == inputs.old.rows == inputs.new.rows:
            raise TrainerError(f"row migration: table {table!r} has {tp.rows} rows, the old and new "
                               f"mappings {inputs.old.rows} and {inputs.new.rows}")
    states = _state_per_row(collection)
    views = {_key(v.table, v): v for v in collection.shard_views() if v.table in jobs}
    for v in views.values():
        if v.replicated:  # the whole table, identical on every rank: the plain migration
            migrate_block(_block(v, states), jobs[v.table])
    cached = {name: inputs for name, inputs in jobs.items() if name in collection.cached}
    for name, inputs in cached.items():
        migrate_row_cache(collection.cached[name], {name: inputs})

    pairs = _pairs(collection, sorted(jobs))
    if not pairs:
        return
    rank, W = collection.rank, collection.world_size
    sums: dict[tuple, PartialSums] = {}  # source shard key -> its partial sums
    send: list[list[torch.Tensor]] = [[] for _ in range(W)]
    for pair in pairs:
        s, key = pair.source, _key(pair.table, pair.source)
        if s.rank != rank:
            continue
        if key not in sums:
            block = _block(views[key], states)
            sums[key] = partial_sums(jobs[pair.table], block.read, s.row_start, s.row_end, block.cols,
                                     block.weight_cols, collection.device)
        send[pair.dest.rank].append(_packet(sums[key], pair))
    sums.clear()
    received = _exchange(collection, send, _fingerprint(jobs))

    acc: dict[tuple, tuple[ShardPlan, torch.Tensor, torch.Tensor]] = {}  # dest key -> (dest, num, glob)
    pos = [0] * W
    for pair in pairs:
        d, key = pair.dest, _key(pair.table, pair.dest)
        if d.rank != rank:
            continue
        cols = _block(views[key], states).cols
        if key not in acc:
            acc[key] = (d, torch.zeros(d.rows, cols, dtype=torch.float64, device=collection.device),
                        torch.zeros(cols, dtype=torch.float64, device=collection.device))
        _, num, glob = acc[key]
        buf, at = received[pair.source.rank], pos[pair.source.rank]
        k, c = int(buf[at]), pair.src_cols.numel()
        rows = buf[at + 1:at + 1 + k].to(torch.int64)
        values = buf[at + 1 + k:at + 1 + k + k * c].view(k, c)
        full = torch.zeros(k, cols, dtype=torch.float64, device=collection.device)
        full.index_copy_(1, pair.dest_cols, values)
        num.index_add_(0, rows, full)
        glob.index_add_(0, pair.dest_cols, buf[at + 1 + k + k * c:at + 1 + k + k * c + c])
        pos[pair.source.rank] = at + 1 + k + k * c + c
    if pos != [r.numel() for r in received]:
        raise TrainerError(f"row migration on rank {rank}: received {[r.numel() for r in received]} values "
                           f"but the plan accounts for {pos}; the ranks disagree on the plan")
    for key, (d, num, glob) in acc.items():
        block = _block(views[key], states)
        inputs = jobs[key[0]]
        den = member_weights(inputs, d.row_start, d.row_end, collection.device)
        block.write(finish(inputs, num, den, glob, block.weight_cols, block.read_all))
