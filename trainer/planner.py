"""The sharding planner: (tables, topology) -> a placement of every table's shards on ranks.

A pure function (no torch, no torch.distributed): the same inputs give the same ``Plan`` on
every rank and every machine, which is what lets each rank of a ``torchrun`` job compute
the plan on its own and agree with the others.

How it places (greedy, largest table first, as TorchRec's greedy proposer does):

1. For each table the candidate shardings are data-parallel (only when the whole table with
   its optimizer state is at most ``data_parallel_max_bytes``), table-wise, column-wise in 2,
   4, ... column blocks (dim divisible, at least ``min_column_shard`` columns each), row-wise
   over all ranks, and table-row-wise over the ranks of each host. A forced type
   (``[sharding] tables``) keeps only that type. A table the row cache holds (``[row_cache]``
   enabled, the table among its ``tables``) has one candidate: table-wise *cached*, only
   ``cache_rows`` rows (and their optimizer state) on its owner's device, the rest on SSD.
2. A candidate's shards go, biggest first, each to the allowed rank with the lowest
   estimated step time that still has room (ties: the lowest rank); shards of one table go
   to distinct ranks.
3. The candidate chosen is the one with the smallest estimated makespan: the larger of the
   slowest rank's step time and the average work once every remaining table is placed at
   its cheapest. This balances the slowest device while preferring the placement that
   costs less in total (table-wise over row-wise when both balance).

When a table fits nowhere, ``PlanError`` says how many bytes are missing and what would
make the plan fit (more ranks, smaller dim, a row cache, fewer rows via hashing).

Example:
    >>> from trainer.cost_model import TableStats
    >>> from trainer.topology import Topology, DeviceKind
    >>> topo = Topology.for_device(DeviceKind.CPU, world_size=2)
    >>> p = plan([TableStats("a", 1000, 8), TableStats("b", 1000, 8)], topo,
    ...          PlannerOptions(global_batch_size=64, data_parallel_max_bytes=0))
    >>> sorted(s.rank for t in p.tables for s in t.shards)
    [0, 1]
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Any, Mapping, Sequence

from trainer.config import (
    CommPrecision, DeviceKind, RowOptimizerKind, ShardingType, SparseOptimizerKind, TrainSpec,
)
from trainer.cost_model import DType, ShardCost, StepShape, TableStats, shard_cost, table_bytes
from trainer.embedding import table_specs
from trainer.errors import PlanError, TrainerConfigError
from trainer.topology import Topology

__all__ = [
    "Placement", "ShardPlan", "TablePlan", "DeviceLoad", "Plan", "PlannerOptions", "plan",
    "even_splits", "format_plan", "plan_from_config", "tables_stats_from_config", "cache_rows_from_config",
]


class Placement(enum.Enum):
    DEVICE = "device"  # every row of the shard in device memory
    CACHED = "cached"  # cache_rows rows on the device, the rest in host memory / on SSD


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Rows ``[row_start, row_end)`` x columns ``[col_start, col_end)`` of a table on ``rank``."""

    rank: int
    row_start: int
    row_end: int
    col_start: int
    col_end: int
    device_bytes: int = 0
    host_bytes: int = 0
    compute_s: float = 0.0
    comm_s: float = 0.0

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def cols(self) -> int:
        return self.col_end - self.col_start


@dataclasses.dataclass(frozen=True)
class TablePlan:
    name: str
    rows: int
    dim: int
    sharding: ShardingType
    placement: Placement
    shards: tuple[ShardPlan, ...]
    cache_rows: int = 0  # CACHED only: rows kept on the device

    @property
    def model_parallel(self) -> bool:
        return self.sharding is not ShardingType.DATA_PARALLEL


@dataclasses.dataclass(frozen=True)
class DeviceLoad:
    """What the plan puts on one rank (estimates per step)."""

    rank: int
    host: int
    device_bytes: int
    device_budget_bytes: int
    host_bytes: int
    compute_s: float
    comm_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclasses.dataclass(frozen=True)
class PlannerOptions:
    """Knobs of the planner (``plan_from_config`` fills them from the config)."""

    global_batch_size: int
    sparse_optimizer: SparseOptimizerKind = SparseOptimizerKind.ROWWISE_ADAGRAD
    comm_precision: CommPrecision = CommPrecision.FP32
    memory_headroom_fraction: float = 0.2
    data_parallel_max_bytes: int = 4 << 20
    forced: Mapping[str, ShardingType] = dataclasses.field(default_factory=dict)
    # tables the row cache holds (placed CACHED, table-wise) -> rows of their device cache
    cache_rows: Mapping[str, int] = dataclasses.field(default_factory=dict)
    min_column_shard: int = 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where every table's shards live, with the estimated per-rank memory and step time."""

    topology: Topology
    global_batch_size: int
    comm_precision: CommPrecision
    tables: tuple[TablePlan, ...]
    devices: tuple[DeviceLoad, ...]

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def max_step_s(self) -> float:
        return max(d.step_s for d in self.devices)

    def table(self, name: str) -> TablePlan:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"plan has no table {name!r}; tables: {[t.name for t in self.tables]}")

    def shards_on(self, rank: int) -> list[tuple[TablePlan, ShardPlan]]:
        """This rank's shards in plan order (tables in input order, shards in table order)."""
        return [(t, s) for t in self.tables for s in t.shards if s.rank == rank]

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
            "comm_precision": self.comm_precision.value,
            "max_step_s": self.max_step_s,
            "topology": self.topology.to_dict(),
            "tables": [
                {"name": t.name, "rows": t.rows, "dim": t.dim, "sharding": t.sharding.value,
                 "placement": t.placement.value, "cache_rows": t.cache_rows,
                 "shards": [dataclasses.asdict(s) for s in t.shards]}
                for t in self.tables
            ],
            "devices": [dict(dataclasses.asdict(d), step_s=d.step_s) for d in self.devices],
        }

    def to_json(self, indent: int | None = None) -> str:
        """One JSON object (the ``headrace plan --json`` output)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def layout_fingerprint(self) -> str:
        """Hash of the shard geometry only (not the cost estimates)."""
        geo = [[t.name, t.rows, t.dim, t.sharding.value, t.placement.value,
                [[s.rank, s.row_start, s.row_end, s.col_start, s.col_end] for s in t.shards]]
               for t in self.tables]
        return hashlib.sha256(json.dumps(geo).encode()).hexdigest()[:16]


def even_splits(n: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges splitting ``n`` into ``parts``, the first ``n % parts`` one
    longer (like ``numpy.array_split``); a range may be empty when ``parts > n``."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


@dataclasses.dataclass(frozen=True)
class _Candidate:
    sharding: ShardingType
    placement: Placement
    # (row_start, row_end, col_start, col_end, fixed rank or None), biggest first
    geometry: tuple[tuple[int, int, int, int, int | None], ...]
    group: tuple[int, ...] | None = None
    cache_rows: int = 0


class _Loads:
    def __init__(self, topo: Topology, budget: int):
        self.topo = topo
        self.budget = budget
        W = topo.world_size
        self.device = [0] * W
        self.compute = [0.0] * W
        self.comm = [0.0] * W
        self.host = [0] * topo.num_hosts

    def step(self, r: int) -> float:
        return self.compute[r] + self.comm[r]


def _candidates(t: TableStats, topo: Topology, opt: PlannerOptions, shape: StepShape) -> list[_Candidate]:
    W = topo.world_size
    forced = opt.forced.get(t.name)
    out: list[_Candidate] = []
    cache = opt.cache_rows.get(t.name, 0)
    if cache > 0:
        # a row-cached table is cached, as it is without sharding; one owner holds its cache
        if forced not in (None, ShardingType.TABLE_WISE):
            return []
        return [_Candidate(ShardingType.TABLE_WISE, Placement.CACHED, ((0, t.rows, 0, t.dim, None),),
                           cache_rows=min(cache, t.rows))]

    def want(kind: ShardingType) -> bool:
        return forced is None or forced is kind

    if want(ShardingType.DATA_PARALLEL) and (forced is not None or table_bytes(t, shape) <= opt.data_parallel_max_bytes):
        out.append(_Candidate(ShardingType.DATA_PARALLEL, Placement.DEVICE,
                              tuple((0, t.rows, 0, t.dim, r) for r in range(W))))
    if want(ShardingType.TABLE_WISE):
        out.append(_Candidate(ShardingType.TABLE_WISE, Placement.DEVICE, ((0, t.rows, 0, t.dim, None),)))
    if want(ShardingType.COLUMN_WISE):
        k = 2
        while k <= W and t.dim % k == 0 and t.dim // k >= opt.min_column_shard:
            out.append(_Candidate(ShardingType.COLUMN_WISE, Placement.DEVICE,
                                  tuple((0, t.rows, c0, c1, None) for c0, c1 in even_splits(t.dim, k))))
            k *= 2
    if want(ShardingType.ROW_WISE) and W > 1:
        out.append(_Candidate(ShardingType.ROW_WISE, Placement.DEVICE,
                              tuple((r0, r1, 0, t.dim, r) for r, (r0, r1) in enumerate(even_splits(t.rows, W)))))
    if want(ShardingType.TABLE_ROW_WISE):
        for h in range(topo.num_hosts):
            ranks = topo.ranks_of_host(h)
            if len(ranks) < 2 and forced is None:
                continue
            out.append(_Candidate(ShardingType.TABLE_ROW_WISE, Placement.DEVICE,
                                  tuple((r0, r1, 0, t.dim, r) for r, (r0, r1)
                                        in zip(ranks, even_splits(t.rows, len(ranks)))),
                                  group=ranks))
    return out


def _cost(t: TableStats, c: _Candidate, g, topo: Topology, shape: StepShape) -> ShardCost:
    r0, r1, c0, c1, _ = g
    return shard_cost(t, c.sharding, r1 - r0, c1 - c0, len(c.geometry), topo, shape, group=c.group,
                      cache_rows=c.cache_rows if c.placement is Placement.CACHED else None)


def _try_place(t: TableStats, c: _Candidate, loads: _Loads, shape: StepShape) -> list[tuple[int, ShardCost]] | None:
    topo = loads.topo
    used: set[int] = set()
    extra_dev: dict[int, int] = {}
    extra_step: dict[int, float] = {}
    extra_host: dict[int, int] = {}
    placed = []
    for g in c.geometry:
        cost = _cost(t, c, g, topo, shape)
        fixed = g[4]
        choices = [fixed] if fixed is not None else [r for r in range(topo.world_size) if r not in used]
        best = None
        for r in choices:
            dev = loads.device[r] + extra_dev.get(r, 0) + cost.device_bytes
            h = topo.host_of(r)
            host = loads.host[h] + extra_host.get(h, 0) + cost.host_bytes
            if dev > loads.budget or host > topo.host_memory_bytes:
                continue
            key = (loads.step(r) + extra_step.get(r, 0.0) + cost.step_s, r)
            if best is None or key < best[0]:
                best = (key, r)
        if best is None:
            return None
        r = best[1]
        used.add(r)
        extra_dev[r] = extra_dev.get(r, 0) + cost.device_bytes
        extra_step[r] = extra_step.get(r, 0.0) + cost.step_s
        extra_host[topo.host_of(r)] = extra_host.get(topo.host_of(r), 0) + cost.host_bytes
        placed.append((r, cost))
    return placed


def plan(tables: Sequence[TableStats], topology: Topology, options: PlannerOptions) -> Plan:
    """Place every table; deterministic for equal inputs (independent of the order of
    ``tables`` except for the order of ``Plan.tables``). Raises ``PlanError`` when no
    placement fits the memory limits, with the shortfall and the ways to fit."""
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise PlanError(f"table names must be unique, got {names}")
    unknown = sorted(set(options.forced) - set(names))
    if unknown:
        raise PlanError(f"[sharding] tables names unknown table(s) {unknown}; tables: {names}")
    shape = StepShape(options.global_batch_size, options.sparse_optimizer,
                      4 if options.comm_precision is CommPrecision.FP32 else 2)
    budget = int(topology.device_memory_bytes * (1.0 - options.memory_headroom_fraction))
    loads = _Loads(topology, budget)
    W = topology.world_size

    cands = {t.name: _candidates(t, topology, options, shape) for t in tables}
    for t in tables:
        if not cands[t.name]:
            kind = options.forced.get(t.name)
            if options.cache_rows.get(t.name, 0) > 0:
                raise PlanError(
                    f"table {t.name!r} is held by the row cache, which places it table-wise, but "
                    f"[sharding] tables forces {kind.value!r}; drop one of the two"
                )
            raise PlanError(
                f"table {t.name!r}: forced sharding {kind.value if kind else None!r} is not possible "
                f"with world_size {W}, dim {t.dim} (column-wise needs dim divisible into blocks of "
                f">= {options.min_column_shard} columns on 2+ ranks; row-wise needs 2+ ranks). "
                "Remove it from [sharding] tables or change the topology."
            )
    min_work = {t.name: min(sum(_cost(t, c, g, topology, shape).step_s for g in c.geometry)
                            for c in cands[t.name]) for t in tables}
    order = sorted(tables, key=lambda t: (-table_bytes(t, shape), -t.lookups_per_sample * t.dim, t.name))
    remaining = sum(min_work.values())
    chosen: dict[str, tuple[_Candidate, list[tuple[int, ShardCost]]]] = {}
    for t in order:
        remaining -= min_work[t.name]
        total_now = sum(loads.step(r) for r in range(W))
        best = None
        for i, c in enumerate(cands[t.name]):
            placed = _try_place(t, c, loads, shape)
            if placed is None:
                continue
            steps = [loads.step(r) for r in range(W)]
            work = sum(cost.step_s for _, cost in placed)
            for r, cost in placed:
                steps[r] += cost.step_s
            makespan = max(max(steps), (total_now + work + remaining) / W)
            key = (makespan, work, i)
            if best is None or key < best[0]:
                best = (key, c, placed)
        if best is None:
            raise _infeasible(t, cands[t.name], tables, topology, options, shape, loads)
        _, c, placed = best
        for r, cost in placed:
            loads.device[r] += cost.device_bytes
            loads.compute[r] += cost.compute_s
            loads.comm[r] += cost.comm_s
            loads.host[topology.host_of(r)] += cost.host_bytes
        chosen[t.name] = (c, placed)

    table_plans = []
    for t in tables:
        c, placed = chosen[t.name]
        shards = tuple(
            ShardPlan(r, g[0], g[1], g[2], g[3], cost.device_bytes, cost.host_bytes, cost.compute_s, cost.comm_s)
            for g, (r, cost) in zip(c.geometry, placed)
        )
        table_plans.append(TablePlan(t.name, t.rows, t.dim, c.sharding, c.placement, shards, c.cache_rows))
    host_share = [0] * W
    for tp in table_plans:
        for s in tp.shards:
            host_share[s.rank] += s.host_bytes
    devices = tuple(
        DeviceLoad(r, topology.host_of(r), loads.device[r], budget, host_share[r], loads.compute[r], loads.comm[r])
        for r in range(W)
    )
    return Plan(topology, options.global_batch_size, options.comm_precision, tuple(table_plans), devices)


def _infeasible(t: TableStats, cands: list[_Candidate], tables: Sequence[TableStats], topo: Topology,
                opt: PlannerOptions, shape: StepShape, loads: _Loads) -> PlanError:
    W = topo.world_size
    budget = loads.budget
    # the smallest footprint of this table on one rank among its candidate splits
    smallest = min(max(_cost(t, c, g, topo, shape).device_bytes for g in c.geometry) for c in cands)
    free = max(budget - min(loads.device), 0)
    short = smallest - free
    need_total = sum(table_bytes(x, shape) for x in tables)
    total_budget = budget * W
    min_ranks = max(-(-need_total // max(budget, 1)), W + 1)
    ratio = total_budget / need_total if need_total else 1.0
    fit_dim = int(t.dim * min(ratio, 1.0)) if ratio < 1.0 else int(t.dim * free / max(smallest, 1))
    fit_rows = int(t.rows * min(ratio, free / max(smallest, 1)))
    fixes = [
        f"more devices: world_size >= {min_ranks} (the tables need {need_total:,} bytes with optimizer "
        f"state; {W} ranks offer {total_budget:,})",
        f"a smaller dim: embedding_dim <= {max(fit_dim, 0)}",
        (f"a row cache: [row_cache] enabled = true (with {t.name!r} among its tables) keeps only "
         "the hot rows on the device"
         if t.name not in opt.cache_rows else
         f"a smaller row cache for {t.name!r} (now {opt.cache_rows[t.name]:,} rows): "
         "[row_cache] cache_rows or cache_bytes"),
        f"fewer rows via hashing: schema.sparse {t.name!r} rows <= {max(fit_rows, 0):,}",
        f"less headroom: [sharding] memory_headroom_fraction (now {opt.memory_headroom_fraction})",
    ]
    forced = opt.forced.get(t.name)
    if forced is not None:
        fixes.insert(0, f"drop the forced {forced.value!r} sharding of {t.name!r} in [sharding] tables")
    return PlanError(
        f"no sharding plan fits table {t.name!r} ({t.rows:,} rows x {t.dim}): its smallest split "
        f"needs {smallest:,} bytes on a rank but at most {free:,} bytes are free on any of the "
        f"{W} ranks ({topo.device.value}, budget {budget:,} bytes each): short by {max(short, 0):,} "
        f"bytes ({max(short, 0) / max(smallest, 1):.0%}). Possible solutions:\n  - " + "\n  - ".join(fixes)
    )




def tables_stats_from_config(cfg: TrainSpec,
                             stats: Mapping[str, Mapping[str, float]] | None = None) -> list[TableStats]:
    """One ``TableStats`` per sparse feature in schema order. ``stats``: measured values per
    feature (keys ``pooling_factor``, ``access_frequency``, ``cache_hit_rate``), e.g. from the
    batch cache's statistics; without them a multi-valued feature is assumed to carry half its
    ``max_values`` per sample and a single-valued one exactly one id."""
    out = []
    stats = stats or {}
    for s, table in zip(cfg.schema.sparse, table_specs(cfg.schema, cfg.trainer.embedding_dim)):
        st = dict(stats.get(s.name, {}))
        bad = sorted(set(st) - {"pooling_factor", "access_frequency", "cache_hit_rate"})
        if bad:
            raise TrainerConfigError(f"table statistics for {s.name!r}: unknown key(s) {bad}")
        pooling = st.get("pooling_factor", max(1.0, s.max_values / 2) if s.multi else 1.0)
        out.append(TableStats(s.name, s.rows, table.dim, dtype=DType(cfg.trainer.embedding_dtype.value),
                              pooling_factor=float(pooling),
                              access_frequency=float(st.get("access_frequency", 1.0)),
                              cache_hit_rate=st.get("cache_hit_rate")))
    return out


def cache_rows_from_config(cfg: TrainSpec) -> dict[str, int]:
    """Tables that ``[row_cache]`` covers -> rows of their device cache (``cache_rows``, or
    as many rows with their row-wise optimizer state as fit in ``cache_bytes``); empty when
    the row cache is off. The planner places exactly those tables as CACHED."""
    rc = cfg.row_cache
    if not rc.enabled:
        return {}
    names = rc.tables or tuple(s.name for s in cfg.schema.sparse)
    unknown = sorted(set(names) - {s.name for s in cfg.schema.sparse})
    if unknown:
        raise TrainerConfigError(f"row_cache.tables names {unknown}, which are not [[schema.sparse]] features")
    state_floats = 1 if rc.optimizer is RowOptimizerKind.ROWWISE_ADAGRAD else 0
    out = {}
    for table in table_specs(cfg.schema, cfg.trainer.embedding_dim):
        if table.name not in names:
            continue
        # the same sizing as trainer.cached_embedding: fp32 row + its row-wise state
        out[table.name] = min(table.rows, rc.cache_rows_for(4 * (table.dim + state_floats)))
    return out


def plan_from_config(cfg: TrainSpec, world_size: int, device: DeviceKind | str | None = None,
                     stats: Mapping[str, Mapping[str, float]] | None = None,
                     cache_rows: Mapping[str, int] | None = None) -> Plan:
    """The plan ``headrace plan`` prints and every rank of ``headrace train`` builds.

    ``device`` overrides ``[sharding] device`` (``"auto"`` must be resolved first, see
    ``trainer.dist.detect_device_kind``). ``trainer.batch_size`` is the global batch, split
    over the ranks (``DistContext.slice_of``). ``cache_rows`` (table -> device cache rows) names the
    tables placed CACHED; None = from ``[row_cache]`` (``cache_rows_from_config``).
    """
    sh = cfg.sharding
    if device is None:
        device = sh.device
    if isinstance(device, str):
        try:
            device = DeviceKind(device)
        except ValueError:
            raise TrainerConfigError(f"device {device!r} is not one of {[d.value for d in DeviceKind]}") from None
    if world_size < 1:
        raise TrainerConfigError(f"world_size must be >= 1, got {world_size}")
    if cfg.trainer.batch_size < world_size:
        raise TrainerConfigError(
            f"trainer.batch_size {cfg.trainer.batch_size} is the global batch, split over "
            f"world_size {world_size} ranks: it must be at least {world_size}"
        )
    if not cfg.schema.sparse:
        raise TrainerConfigError("nothing to shard: the schema declares no [[schema.sparse]] features")
    topo = Topology.for_device(device, world_size, devices_per_host=sh.devices_per_host,
                               device_memory_bytes=sh.device_memory_bytes,
                               host_memory_bytes=sh.host_memory_bytes)
    options = PlannerOptions(
        global_batch_size=cfg.trainer.batch_size,
        sparse_optimizer=cfg.trainer.sparse_optimizer_kind,
        comm_precision=sh.comm_precision,
        memory_headroom_fraction=sh.memory_headroom_fraction,
        data_parallel_max_bytes=sh.data_parallel_max_bytes,
        forced=dict(sh.tables),
        cache_rows=dict(cache_rows_from_config(cfg) if cache_rows is None else cache_rows),
    )
    return plan(tables_stats_from_config(cfg, stats), topo, options)


def format_plan(plan: Plan) -> str:
    """A human-readable summary (``headrace plan`` without ``--json``): one line per table,
    one per rank with its memory against the budget and its estimated step time."""
    topo = plan.topology
    lines = [f"plan for {plan.world_size} rank(s) on {topo.num_hosts} host(s), {topo.device.value}, "
             f"global batch {plan.global_batch_size}, {plan.comm_precision.value} exchange"]
    for t in plan.tables:
        ranks = ",".join(str(s.rank) for s in t.shards)
        extra = f", {t.cache_rows:,} cached rows" if t.placement is Placement.CACHED else ""
        lines.append(f"  table {t.name}: {t.rows:,} x {t.dim} {t.sharding.value} ({t.placement.value}{extra}) "
                     f"on rank(s) {ranks}")
    for d in plan.devices:
        lines.append(f"  rank {d.rank} (host {d.host}): {d.device_bytes / 2**20:,.1f} MiB of "
                     f"{d.device_budget_bytes / 2**20:,.1f} MiB, host {d.host_bytes / 2**20:,.1f} MiB, "
                     f"step ~{d.step_s * 1e6:,.1f} us (compute {d.compute_s * 1e6:,.1f}, comm {d.comm_s * 1e6:,.1f})")
    return "\n".join(lines)
