"""Row migration of sharded tables on real gloo process groups (2 and 4 ranks spawned by the
test) equals the plain single-process migration of the same trained model.

Each job trains a sharded model a few steps (so rows and optimizer state are not at their
init), then migrates every table at a mapping change with ``trainer.migrate.migrate_model``:
every rank computes its shards' partial sums and one all-to-all moves them to the shards
their new rows belong to. The reference trains the plain fused collection on the same
batches and migrates it the same way. Mappings: modulo -> learned (one lookup), double
(two lookups, often on different row shards) -> learned, modulo -> double, and learned ->
learned, over every placement: table-, row-, column-, table-row-wise, replicated, and an
SSD row-cached table on its owner. Tolerance 1e-5 (float64 sums in another order, then
fp32): weights, and optimizer state relative to its magnitude.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from engine.config import config_from_dict
from tests.trainer.rank_worker import rank_errors_to
from tests.trainer.test_sharded_train import TABLES, bce, make_batches, state_names
from trainer.batch import TrainBatch

# Multi-process: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

STEPS = 3
TOL = 1e-5


def stats_of(rows: int):
    from transforms.hash_fit import IdStats

    rng = np.random.default_rng(rows)
    ids = rng.integers(-(1 << 40), 1 << 40, 6 * rows, dtype=np.int64)
    counts = rng.zipf(1.3, ids.size).clip(max=1000).astype(np.float64)
    return IdStats(ids, counts, rng.binomial(counts.astype(int), 0.3).astype(float))


def mappings() -> tuple[dict, dict, dict]:
    """(old, new, stats) per table: a different kind of change for each. Made once by the
    test process and handed to the ranks (fits are the slow part of a rank's start)."""
    from transforms.hash_fit import LearnedFitParams, fit_learned
    from transforms.mappers import DoubleHashMapper, ModuloMapper

    old, new, stats = {}, {}, {}
    for name, rows in TABLES.items():
        st = stats_of(rows)
        learned = fit_learned(st, rows, LearnedFitParams(hot_fraction=0.3, reserve_fraction=0.1))
        old[name], new[name] = {
            "a": (ModuloMapper(rows), learned),
            "b": (DoubleHashMapper(rows), learned),
            "c": (ModuloMapper(rows), DoubleHashMapper(rows)),
            "d": (fit_learned(st, rows, LearnedFitParams(hot_fraction=0.1)), learned),
        }[name]
        stats[name] = (st.ids, st.counts)
    return old, new, stats


DIM = 8
BATCH = 16
HEAD = torch.linspace(-1.0, 1.0, DIM)  # a fixed deep head: the collections are what trains


def make_cfg(job: dict, dim: int, out: str):
    """The job's config with ``dim``-wide tables; the 1-wide ("wide") tables are placed like
    the deep ones except column-wise (one column cannot be split): table-wise."""
    forced = job["forced"] if dim > 1 else {t: ("table_wise" if k == "column_wise" else k)
                                            for t, k in job["forced"].items()}
    row_cache = {}
    if job.get("row_cache"):
        # table "a" lives on SSD behind a 20-row cache (40 rows: evictions every step)
        row_cache = {"enabled": True, "tables": ["a"], "cache_rows": 20, "optimizer": "sgd", "fsync": False,
                     "path": os.path.join(out, f"{job['name']}-rows-{dim}")}
    return config_from_dict({
        "row_cache": row_cache,
        "schema": {"dense": [{"name": "x0"}, {"name": "x1"}],
                   "sparse": [{"name": n, "rows": r, "multi": n == "b"} for n, r in TABLES.items()]},
        "trainer": {"embedding_dim": dim, "bottom_mlp": [dim], "top_mlp": [4], "batch_size": BATCH,
                    "sparse_optimizer": job.get("sparse", "rowwise_adagrad"), "learning_rate": 0.1, "seed": 3},
        "sharding": {"enabled": True, "device": "cpu", "tables": forced,
                     "devices_per_host": job.get("devices_per_host", 0)},
    })


class DeepAndWide(torch.nn.Module):
    """A deep (``DIM``-wide) and a wide (1-wide) collection serving the same features, as a
    model with ``[model] wide`` holds them; ``embedding_collections()`` declares both."""

    def __init__(self, deep: torch.nn.Module, wide: torch.nn.Module):
        super().__init__()
        self.embeddings, self.wide = deep, wide

    def embedding_collections(self) -> dict[str, torch.nn.Module]:
        return {"embeddings": self.embeddings, "first_order.embeddings": self.wide}

    def forward(self, sparse) -> torch.Tensor:
        return (self.embeddings(sparse) * HEAD).sum(dim=(1, 2)) + self.wide(sparse).sum(dim=(1, 2))

    def train_on(self, batch: TrainBatch, loss_scale: float = 1.0) -> None:
        (bce(self(batch.sparse), batch.labels) * loss_scale).backward()
        self.embeddings.sparse_step()
        self.wide.sparse_step()


def tables_and_states(collections: dict, cfgs: dict, full_table=None) -> dict:
    """``{"tables"|"states": {"<part>/<table>": ...}}`` of both collections, fp32 on the CPU."""
    out = {"tables": {}, "states": {}}
    for part, emb in collections.items():
        for n in TABLES:
            if full_table is not None:
                out["tables"][f"{part}/{n}"] = emb.full_table(n)
                out["states"][f"{part}/{n}"] = {k: emb.full_table(n, state=k) for k in state_names(cfgs[part])}
            else:
                t = next(i for i, spec in enumerate(emb.tables) if spec.name == n)
                start, rows = emb.table_starts[t], emb.tables[t].rows
                out["tables"][f"{part}/{n}"] = emb.per_table_weights()[n].float().clone()
                out["states"][f"{part}/{n}"] = {k: v[start:start + rows].clone()
                                                for k, v in emb.optimizer_state().items()}
    return out


def sharded_worker(rank: int, world: int, init_file: str, out_dir: str, jobs: list[dict], changes: tuple) -> None:
    """One rank: for each job, train the sharded model ``STEPS`` steps on its slice of each
    batch, migrate, and (rank 0) save the reassembled tables and state as ``<name>.pt``."""
    with rank_errors_to(out_dir, rank):
        from trainer.dist import init_process_group
        from trainer.migrate import migrate_model
        from trainer.planner import plan_from_config
        from trainer.sharding import build_sharded_embeddings, local_slice

        torch.set_num_threads(1)
        ctx = init_process_group(rank, world, "file://" + init_file, timeout_s=120)
        old, new, stats = changes
        for job in jobs:
            cfgs = {"deep": make_cfg(job, DIM, out_dir), "wide": make_cfg(job, 1, out_dir)}
            plans = {part: plan_from_config(cfg, world, "cpu") for part, cfg in cfgs.items()}
            parts = {part: build_sharded_embeddings(cfgs[part], plans[part], ctx) for part in cfgs}
            model = DeepAndWide(parts["deep"], parts["wide"])
            lo, hi = ctx.slice_of(BATCH)
            for b in make_batches(STEPS):
                model.train_on(local_slice(b, lo, hi), ctx.loss_scale(BATCH))
            report = migrate_model(model, None, old, new, stats)
            assert sorted(report) == sorted(TABLES), report
            res = tables_and_states(parts, cfgs, full_table=True)
            if rank == 0:
                res["layout"] = {t.name: t.sharding.value for t in plans["deep"].tables}
                torch.save(res, os.path.join(out_dir, job["name"] + ".pt"))


def run_jobs(out, world: int, jobs: list[dict], changes: tuple) -> dict[str, dict]:
    """Run ``jobs`` on ``world`` ranks: rank 0 in this process (torch is already imported
    here, a process start is most of the test's time), the others spawned."""
    out.mkdir(exist_ok=True)
    args = (world, str(out / f"init-{world}"), str(out), jobs, changes)
    procs = [mp.get_context("spawn").Process(target=sharded_worker, args=(rank, *args)) for rank in range(1, world)]
    for p in procs:
        p.start()
    threads = torch.get_num_threads()
    try:
        sharded_worker(0, *args)
    except BaseException as exc:
        for p in procs:
            p.join(timeout=10)
        errors = "\n".join(p.read_text() for p in out.glob("error-*.txt"))
        raise AssertionError(f"a rank failed:\n{errors or exc}") from None
    finally:
        torch.set_num_threads(threads)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs), "\n".join(p.read_text() for p in out.glob("error-*.txt"))
    return {j["name"]: torch.load(out / (j["name"] + ".pt"), weights_only=True) for j in jobs}


def plain_reference(job: dict, out: str, changes: tuple) -> dict:
    """Plain fused collections trained on the same whole batches, then migrated."""
    from trainer.migrate import migrate_model
    from trainer.model import fused_embeddings_from_config

    cfgs = {part: make_cfg({**job, "row_cache": None}, dim, out) for part, dim in (("deep", DIM), ("wide", 1))}
    parts = {part: fused_embeddings_from_config(cfg) for part, cfg in cfgs.items()}
    model = DeepAndWide(parts["deep"], parts["wide"])
    for b in make_batches(STEPS):
        model.train_on(b)
    before = tables_and_states(parts, cfgs)
    migrate_model(model, None, *changes)
    return {**tables_and_states(parts, cfgs), "before": before["tables"]}


# Every placement on 2 ranks: table-row-wise and row-wise tables exchange rows between the
# ranks, column-wise ones keep them on each column shard, replicas migrate alike everywhere.
# 4 ranks run the same code (pairs of shards by the plan) but cost four more process starts
# (~10 s of the suite on a 2-core machine): run them with HEADRACE_TEST_FOUR_RANKS=1.
TWO = {"a": "table_row_wise", "b": "row_wise", "c": "column_wise", "d": "data_parallel"}
TWO_MORE = {"a": "row_wise", "b": "column_wise", "c": "table_wise", "d": "row_wise"}
FOUR = {"a": "table_row_wise", "b": "column_wise", "c": "row_wise", "d": "data_parallel"}
JOBS = {
    2: [
        {"name": "two", "forced": TWO, "devices_per_host": 2},
        {"name": "two_adam", "forced": TWO_MORE, "sparse": "adam"},  # element-wise state moves too
        {"name": "two_cached", "forced": {"a": "table_wise", "b": "row_wise", "c": "column_wise"},
         "sparse": "sgd", "row_cache": "rows"},  # "a" on SSD on its owner
    ],
}
if os.environ.get("HEADRACE_TEST_FOUR_RANKS"):
    JOBS[4] = [{"name": "four", "forced": FOUR, "devices_per_host": 2}]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("migrate_sharded")
    res = {"out": str(out), "changes": mappings()}
    for world, jobs in JOBS.items():
        res.update(run_jobs(out, world, jobs, res["changes"]))
    return res


@pytest.mark.parametrize("name", [j["name"] for jobs in JOBS.values() for j in jobs])
def test_sharded_migration_equals_plain_migration(results, name):
    job = next(j for jobs in JOBS.values() for j in jobs if j["name"] == name)
    res = results[name]
    for table, kind in job["forced"].items():
        assert res["layout"][table] == kind, res["layout"]
    ref = plain_reference(job, results["out"], results["changes"])
    # the migration really moved rows: the comparison is not between two unchanged tables
    assert all((ref["tables"][n] - ref["before"][n]).abs().max() > 1e-3 for n in ref["tables"])
    for key, want in ref["tables"].items():
        diff = (res["tables"][key] - want).abs().max().item()
        assert diff <= TOL, f"{key} ({res['layout'][key.split('/')[1]]}) differs by {diff}"
        for state, value in ref["states"][key].items():
            got = res["states"][key][state]
            assert got.shape == value.shape, (key, state)
            scale = max(value.abs().max().item(), 1e-12)
            diff = (got - value).abs().max().item()
            assert diff <= TOL * scale, f"{state} of {key} differs by {diff} (scale {scale})"
