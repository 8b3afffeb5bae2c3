"""The sharding planner: hand-checkable placements, memory limits, helpful errors, determinism."""

from __future__ import annotations

import json
import random

import pytest

from engine.config import DeviceKind, ShardingType, config_from_dict
from engine.errors import ConfigError
from trainer.config import SparseOptimizerKind
from trainer.cost_model import DType, StepShape, TableStats, optimizer_state_bytes_per_row, shard_cost, table_bytes
from trainer.errors import PlanError, TrainerConfigError
from trainer.planner import Placement, PlannerOptions, even_splits, format_plan, plan, plan_from_config
from trainer.sparse_optim import state_bytes_per_row
from trainer.topology import Topology

MIB = 1 << 20


def _doc(cfg) -> dict:
    """The config document of a loaded config's schema and trainer (enums as their values)."""
    import dataclasses
    import enum

    def plain(v):
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return v

    trainer = {k: v for k, v in plain(cfg.trainer).items() if v is not None}
    return {"schema": plain(cfg.schema), "trainer": trainer, "sharding": {"enabled": True}}


def cpu(world: int, per_host: int = 0, mem: int = 0) -> Topology:
    return Topology.for_device(DeviceKind.CPU, world, devices_per_host=per_host, device_memory_bytes=mem)


def opts(**kw) -> PlannerOptions:
    kw.setdefault("global_batch_size", 64)
    kw.setdefault("data_parallel_max_bytes", 0)
    return PlannerOptions(**kw)


def covers(tp) -> bool:
    """The shards tile rows x cols exactly once."""
    count = [[0] * tp.dim for _ in range(tp.rows)] if tp.rows * tp.dim <= 1_000_000 else None
    if count is None:  # big tables: pairwise-disjoint rectangles with the right total area
        rects = [(s.row_start, s.row_end, s.col_start, s.col_end) for s in tp.shards]
        disjoint = all(a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2]
                       for i, a in enumerate(rects) for b in rects[i + 1:])
        return disjoint and sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in rects) == tp.rows * tp.dim
    for s in tp.shards:
        for r in range(s.row_start, s.row_end):
            for c in range(s.col_start, s.col_end):
                count[r][c] += 1
    return all(x == 1 for row in count for x in row)


def test_even_splits_first_ranges_are_longer():
    assert even_splits(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert even_splits(2, 3) == [(0, 1), (1, 2), (2, 2)]


def test_single_rank_table_wise_memory_is_hand_checkable():
    t = TableStats("a", rows=1000, dim=8)
    p = plan([t], cpu(1), opts(global_batch_size=64))
    tp = p.table("a")
    assert tp.sharding is ShardingType.TABLE_WISE and tp.placement is Placement.DEVICE
    (s,) = tp.shards
    assert (s.rank, s.row_start, s.row_end, s.col_start, s.col_end) == (0, 0, 1000, 0, 8)
    # weights 4 B per element + row-wise Adagrad 4 B per row (no dense gradient); ids 64 x 8 B;
    # out + grad 2 x 64 x 8 x 4 B; deduplicated row gradients (at most 64 rows) 64 x 8 x 4 B
    assert s.device_bytes == 1000 * (8 * 4 + 4) + 64 * 8 + 2 * 64 * 8 * 4 + 64 * 8 * 4
    assert p.devices[0].device_bytes == s.device_bytes
    assert s.comm_s == 0.0  # one rank: nothing crosses the wire


def test_equal_tables_spread_table_wise_one_per_rank():
    tables = [TableStats(f"t{i}", rows=10_000, dim=16) for i in range(4)]
    p = plan(tables, cpu(4), opts())
    assert [t.sharding for t in p.tables] == [ShardingType.TABLE_WISE] * 4
    assert sorted(t.shards[0].rank for t in p.tables) == [0, 1, 2, 3]
    steps = [d.step_s for d in p.devices]
    assert max(steps) == pytest.approx(min(steps))


def test_small_table_is_replicated_when_allowed():
    small = TableStats("small", rows=10, dim=4)
    p = plan([small], cpu(4), opts(data_parallel_max_bytes=MIB))
    tp = p.table("small")
    assert tp.sharding is ShardingType.DATA_PARALLEL
    assert [s.rank for s in tp.shards] == [0, 1, 2, 3]
    assert all((s.row_start, s.row_end, s.col_start, s.col_end) == (0, 10, 0, 4) for s in tp.shards)


def test_forced_row_wise_splits_rows_evenly():
    t = TableStats("u", rows=10, dim=4)
    p = plan([t], cpu(4), opts(forced={"u": ShardingType.ROW_WISE}))
    tp = p.table("u")
    assert tp.sharding is ShardingType.ROW_WISE
    assert [(s.rank, s.row_start, s.row_end) for s in tp.shards] == [(0, 0, 3), (1, 3, 6), (2, 6, 8), (3, 8, 10)]
    assert covers(tp)


def test_forced_column_wise_uses_distinct_ranks_and_tiles_columns():
    t = TableStats("u", rows=100, dim=16)
    p = plan([t], cpu(4), opts(forced={"u": ShardingType.COLUMN_WISE}))
    tp = p.table("u")
    assert tp.sharding is ShardingType.COLUMN_WISE
    cols = sorted((s.col_start, s.col_end) for s in tp.shards)
    assert cols[0][0] == 0 and cols[-1][1] == 16
    assert all(a[1] == b[0] for a, b in zip(cols, cols[1:]))
    assert len({s.rank for s in tp.shards}) == len(tp.shards) >= 2
    assert covers(tp)


def test_forced_table_row_wise_stays_inside_one_host():
    t = TableStats("u", rows=9, dim=4)
    p = plan([t], cpu(4, per_host=2), opts(forced={"u": ShardingType.TABLE_ROW_WISE}))
    tp = p.table("u")
    ranks = [s.rank for s in tp.shards]
    assert ranks in ([0, 1], [2, 3])
    assert [(s.row_start, s.row_end) for s in tp.shards] == [(0, 5), (5, 9)]


def test_row_wise_shard_memory_is_a_quarter_of_table_wise():
    t = TableStats("u", rows=4000, dim=8)
    shape = StepShape(64)
    topo = cpu(4)
    tw = shard_cost(t, ShardingType.TABLE_WISE, 4000, 8, 1, topo, shape)
    rw = shard_cost(t, ShardingType.ROW_WISE, 1000, 8, 4, topo, shape)
    # rows (weights + row-wise state) + a share of the ids and of their row gradients
    assert tw.device_bytes - rw.device_bytes == 3000 * (8 * 4 + 4) + 3 * 16 * 8 + 3 * 16 * 8 * 4
    assert rw.comm_s > tw.comm_s / 4  # row-wise ships full partial sums


def test_table_too_big_for_one_device_is_split_within_memory_limits():
    big = TableStats("big", rows=100_000, dim=16)  # 19.2 MB with grad + adagrad state
    topo = cpu(4, mem=8 * MIB)
    p = plan([big], topo, opts(memory_headroom_fraction=0.0))
    tp = p.table("big")
    assert tp.sharding in (ShardingType.ROW_WISE, ShardingType.COLUMN_WISE, ShardingType.TABLE_ROW_WISE)
    assert covers(tp)
    for d in p.devices:
        assert d.device_bytes <= d.device_budget_bytes == 8 * MIB


def test_memory_limit_moves_second_table_off_the_full_rank():
    a = TableStats("a", rows=50_000, dim=8)  # 4.8 MB
    b = TableStats("b", rows=50_000, dim=8)
    p = plan([a, b], cpu(2, mem=6 * MIB), opts(memory_headroom_fraction=0.0,
                                                 forced={"a": ShardingType.TABLE_WISE, "b": ShardingType.TABLE_WISE}))
    assert {p.table("a").shards[0].rank, p.table("b").shards[0].rank} == {0, 1}


def test_cached_placement_when_only_the_row_cache_fits():
    big = TableStats("big", rows=1_000_000, dim=16)  # 192 MB on one rank
    topo = cpu(1, mem=16 * MIB)
    with pytest.raises(PlanError):
        plan([big], topo, opts(memory_headroom_fraction=0.0))
    p = plan([big], topo, opts(memory_headroom_fraction=0.0, cache_rows={"big": 10_000}))
    tp = p.table("big")
    assert tp.placement is Placement.CACHED and tp.cache_rows == 10_000
    s = tp.shards[0]
    assert s.device_bytes < 16 * MIB
    assert s.host_bytes == 1_000_000 * (16 * 4 + 4)  # rows + row-wise state behind the cache
    # only the cached rows and their state, plus the step buffers
    assert s.device_bytes == 10_000 * (16 * 4 + 4) + 64 * 8 + 2 * 64 * 16 * 4 + 64 * 16 * 4


def test_infeasible_plan_says_by_how_much_and_how_to_fit():
    big = TableStats("huge", rows=10_000_000, dim=64)
    with pytest.raises(PlanError) as err:
        plan([big], cpu(2, mem=64 * MIB), opts())
    msg = str(err.value)
    assert "'huge'" in msg and "short by" in msg
    for hint in ("world_size >=", "embedding_dim <=", "[row_cache]", "rows <="):
        assert hint in msg, hint


def test_forced_impossible_sharding_is_named():
    t = TableStats("u", rows=100, dim=6)
    with pytest.raises(PlanError, match="column-wise"):
        plan([t], cpu(4), opts(forced={"u": ShardingType.COLUMN_WISE}))
    with pytest.raises(PlanError, match="unknown table"):
        plan([t], cpu(4), opts(forced={"nope": ShardingType.ROW_WISE}))


def test_plans_are_deterministic_and_independent_of_input_order():
    rnd = random.Random(7)
    tables = [TableStats(f"t{i}", rows=rnd.randint(10, 200_000), dim=16,
                         pooling_factor=rnd.choice([1.0, 4.0, 20.0])) for i in range(12)]
    topo = Topology.for_device(DeviceKind.H100, 16)
    o = opts(global_batch_size=4096, data_parallel_max_bytes=MIB)
    p1 = plan(tables, topo, o)
    p2 = plan(list(reversed(tables)), topo, o)
    assert p1.to_json() == plan(tables, topo, o).to_json()
    layout = lambda p: {t.name: (t.sharding, [(s.rank, s.row_start, s.col_start) for s in t.shards]) for t in p.tables}
    assert layout(p1) == layout(p2)
    for t in p1.tables:
        assert covers(t) or t.sharding is ShardingType.DATA_PARALLEL


def test_reduced_precision_halves_output_traffic():
    t = TableStats("u", rows=1000, dim=16)
    topo = cpu(4)
    f32 = shard_cost(t, ShardingType.TABLE_WISE, 1000, 16, 1, topo, StepShape(64, comm_bytes_per_element=4))
    b16 = shard_cost(t, ShardingType.TABLE_WISE, 1000, 16, 1, topo, StepShape(64, comm_bytes_per_element=2))
    ids = 0.75 * 64 * 8 / topo.intra_host_bw_bytes_per_s
    assert (b16.comm_s - ids) == pytest.approx((f32.comm_s - ids) / 2)


def test_plan_from_config_and_json():
    cfg = config_from_dict({
        "schema": {"dense": [{"name": "x"}],
                   "sparse": [{"name": "a", "rows": 1000}, {"name": "b", "rows": 50, "multi": True}]},
        "trainer": {"batch_size": 64},
        "sharding": {"tables": {"a": "column_wise"}, "comm_precision": "bf16"},
    })
    p = plan_from_config(cfg, 4, "cpu")
    d = json.loads(p.to_json())
    assert d["world_size"] == 4 and d["comm_precision"] == "bf16"
    assert [t["name"] for t in d["tables"]] == ["a", "b"]
    assert d["tables"][0]["sharding"] == "column_wise"
    assert len(d["devices"]) == 4 and all("device_bytes" in x and "step_s" in x for x in d["devices"])
    with pytest.raises(TrainerConfigError, match="at least 128"):
        plan_from_config(cfg, 128, "cpu")
    with pytest.raises(TrainerConfigError, match="auto"):
        plan_from_config(cfg, 4, DeviceKind.AUTO)
    h200 = plan_from_config(cfg, 4, "h200")
    assert h200.devices[0].device_budget_bytes > plan_from_config(cfg, 4, "h100").devices[0].device_budget_bytes


def test_sharding_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="row_wize"):
        config_from_dict({"schema": {"dense": [{"name": "x"}]}, "sharding": {"tables": {"a": "row_wize"}}})
    with pytest.raises(ConfigError, match="memory_headroom_fraction"):
        config_from_dict({"schema": {"dense": [{"name": "x"}]}, "sharding": {"memory_headroom_fraction": 1.5}})


def test_table_bytes_counts_the_sparse_optimizer_state():
    t = TableStats("u", rows=10, dim=4)
    assert table_bytes(t, StepShape(8)) == 10 * (4 * 4 + 4)  # row-wise Adagrad: 4 B a row
    assert table_bytes(t, StepShape(8, sparse_optimizer=SparseOptimizerKind.SGD)) == 10 * 4 * 4
    assert table_bytes(t, StepShape(8, sparse_optimizer=SparseOptimizerKind.ADAGRAD)) == 10 * 4 * 8
    assert table_bytes(t, StepShape(8, sparse_optimizer=SparseOptimizerKind.ADAM)) == 10 * 4 * 12
    assert table_bytes(TableStats("h", rows=10, dim=4, dtype=DType.BF16), StepShape(8)) == 10 * (4 * 2 + 4)


@pytest.mark.parametrize("kind", list(SparseOptimizerKind))
def test_state_bytes_follow_the_optimizer_implementation(kind):
    for dim in (1, 16, 128):
        assert optimizer_state_bytes_per_row(kind, dim) == state_bytes_per_row(kind, dim)


def test_criteo_1tb_tables_at_d128_fit_on_two_h100():
    # TorchRec's Criteo-1TB cardinalities capped at 40M rows: 163M rows, 83.5 GB of fp32
    # weights at D=128; row-wise Adagrad adds 0.65 GB (element-wise Adagrad would add 83.5).
    caps = [45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138,
            10, 2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35]
    cfg = config_from_dict({
        "schema": {"dense": [{"name": f"d{i}"} for i in range(13)],
                   "sparse": [{"name": f"c{i}", "rows": min(c, 40_000_000)} for i, c in enumerate(caps)]},
        "trainer": {"embedding_dim": 128, "bottom_mlp": [512, 256, 128], "batch_size": 65536},
        "sharding": {"enabled": True},
    })
    p = plan_from_config(cfg, 2, "h100")
    for d in p.devices:
        assert d.device_bytes <= d.device_budget_bytes  # the budget keeps 20% headroom
        assert d.device_bytes < 0.8 * 80e9
    with pytest.raises(PlanError):  # one H100 cannot hold them
        plan_from_config(cfg, 1, "h100")
    element_wise = config_from_dict({**_doc(cfg), "trainer": {**_doc(cfg)["trainer"], "sparse_optimizer": "adagrad"}})
    with pytest.raises(PlanError):  # element-wise state doubles the bytes: two do not suffice
        plan_from_config(element_wise, 2, "h100")


def test_row_cache_config_allows_a_cached_placement_in_plan_from_config():
    base = {"schema": {"dense": [{"name": "x"}], "sparse": [{"name": "big", "rows": 2_000_000}]},
            "trainer": {"batch_size": 64},
            "sharding": {"device_memory_bytes": 64 * MIB, "memory_headroom_fraction": 0.0}}
    with pytest.raises(PlanError, match="row_cache"):
        plan_from_config(config_from_dict(base), 1, "cpu")
    cfg = config_from_dict(dict(base, row_cache={"enabled": True, "cache_rows": 50_000}))
    tp = plan_from_config(cfg, 1, "cpu").table("big")
    assert tp.placement is Placement.CACHED and tp.cache_rows == 50_000
    assert json.loads(plan_from_config(cfg, 1, "cpu").to_json())["tables"][0]["placement"] == "cached"


def test_sparse_updates_charge_only_touched_rows():
    t = TableStats("u", rows=1_000_000, dim=16)
    topo = cpu(1)
    big = shard_cost(t, ShardingType.TABLE_WISE, 1_000_000, 16, 1, topo, StepShape(64))
    small = shard_cost(t, ShardingType.TABLE_WISE, 1000, 16, 1, topo, StepShape(64))
    assert big.compute_s == pytest.approx(small.compute_s)  # both update the 64 rows they saw
    assert big.device_bytes - small.device_bytes == 999_000 * (16 * 4 + 4)
    # a data-parallel replica also fills and all-reduces a dense [rows, D+1] gradient buffer
    replica = shard_cost(t, ShardingType.DATA_PARALLEL, 1_000_000, 16, 1, topo, StepShape(64))
    assert replica.compute_s > 1000 * big.compute_s
    assert replica.device_bytes == 1_000_000 * (16 * 4 + 4) + 1_000_000 * 17 * 4 + 64 * 8 + 2 * 64 * 16 * 4


def test_row_cached_table_cannot_be_forced_to_another_sharding():
    t = TableStats("u", rows=1000, dim=8)
    with pytest.raises(PlanError, match="row cache"):
        plan([t], cpu(2), opts(cache_rows={"u": 10}, forced={"u": ShardingType.ROW_WISE}))
    p = plan([t, TableStats("v", rows=1000, dim=8)], cpu(2), opts(cache_rows={"u": 10}))
    assert p.table("u").placement is Placement.CACHED and p.table("v").placement is Placement.DEVICE


def test_measured_statistics_steer_the_plan_and_format_names_every_rank():
    cfg = config_from_dict({
        "schema": {"dense": [{"name": "x"}],
                   "sparse": [{"name": "a", "rows": 1000, "multi": True}, {"name": "b", "rows": 1000}]},
        "trainer": {"batch_size": 64},
    })
    stats = {"a": {"pooling_factor": 30.0, "access_frequency": 0.5}}
    p = plan_from_config(cfg, 2, "cpu", stats=stats)
    a, b = p.table("a").shards[0], p.table("b").shards[0]
    # a's shard serves 15 ids per sample, b's one: a's lookups and id traffic cost more
    assert a.comm_s > b.comm_s
    with pytest.raises(TrainerConfigError, match="pooling"):
        plan_from_config(cfg, 2, "cpu", stats={"a": {"pooling": 3.0}})
    text = format_plan(p)
    assert "table a:" in text and "rank 1 (host 0)" in text
