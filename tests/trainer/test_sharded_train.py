"""Sharded training on real gloo process groups (2 and 4 ranks spawned by the test) matches
plain single-process training (every table in one fused collection, the same sparse
optimizer, ``trainer.model.fused_embeddings_from_config``) on the same global batches and
seed, and sharded checkpoints resume on 2 ranks and on 1 rank under other plans exactly like
the run that never stopped.

To keep the suite quick, one spawn per world size runs every job of that size on the same
process group (``JOBS``); the tests then compare each job's result with the reference.

Tolerances: fp32 exchanges agree with the single-process run to 1e-5 (only summation order
differs), weights and optimizer state alike, for every sharding type and sparse optimizer;
bf16 exchanges round pooled vectors and gradients to 8 mantissa bits, so with SGD losses and
rows agree to 2e-2 after a few steps. bf16 rows are rounded stochastically with the bits the
plain run uses for the same row and column, so they agree with a bf16 plain run except where
a last-bit difference of the fp32 value tips a rounding (one bf16 step, rare).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from engine.config import config_from_dict
from tests.trainer.rank_worker import rank_errors_to
from trainer.batch import Jagged, TrainBatch
from trainer.model import DLRM, fused_embeddings_from_config
from trainer.optim import build_optimizer
from trainer.sparse_optim import state_shapes

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

STEPS = 4
GLOBAL_BATCH = 16
TABLES = {"a": 40, "b": 30, "c": 25, "d": 12}


def make_cfg(forced: dict[str, str], *, devices_per_host: int = 0, precision: str = "fp32",
             sparse: str = "rowwise_adagrad", dense: str = "adagrad", dtype: str = "fp32",
             row_cache: dict | None = None):
    return config_from_dict({
        "row_cache": row_cache or {},
        # the embedding tables alone: tests/trainer/test_model_kinds.py shards the first-order ones
        "model": {"wide": False},
        "schema": {"dense": [{"name": "x0"}, {"name": "x1"}],
                   "sparse": [{"name": n, "rows": r, "multi": n == "b"} for n, r in TABLES.items()]},
        "trainer": {"embedding_dim": 8, "bottom_mlp": [8], "top_mlp": [8], "batch_size": GLOBAL_BATCH,
                    "sparse_optimizer": sparse, "dense_optimizer": dense, "learning_rate": 0.1,
                    "embedding_dtype": dtype, "seed": 3},
        "sharding": {"enabled": True, "device": "cpu", "tables": forced,
                     "devices_per_host": devices_per_host, "comm_precision": precision},
    })


def job_cfg(job: dict):
    return make_cfg(job["forced"], devices_per_host=job.get("devices_per_host", 0),
                    precision=job.get("precision", "fp32"), sparse=job.get("sparse", "rowwise_adagrad"),
                    dtype=job.get("dtype", "fp32"), row_cache=job.get("row_cache"))


def make_batches(steps: int = STEPS, seed: int = 11, batch: int = GLOBAL_BATCH) -> list[TrainBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        sparse = {}
        for name, rows in TABLES.items():
            if name == "b":  # multi-valued and weighted, 0..3 ids per sample (empty bags included)
                lens = torch.randint(0, 4, (batch,), generator=g)
            else:
                lens = torch.ones(batch, dtype=torch.int64)
            offsets = torch.zeros(batch + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(lens, 0)
            n = int(offsets[-1])
            weights = torch.rand(n, generator=g) + 0.5 if name == "b" else None
            sparse[name] = Jagged(torch.randint(0, rows, (n,), generator=g), offsets, weights)
        out.append(TrainBatch(torch.randn(batch, 2, generator=g), sparse,
                              torch.randint(0, 2, (batch,), generator=g).float()))
    return out


def make_optimizer(cfg, params):
    return build_optimizer(cfg.trainer.dense_optimizer_kind, params, cfg.trainer.dense_lr)


def state_names(cfg) -> list[str]:
    return list(state_shapes(cfg.trainer.sparse_optimizer_kind, 1, 1))


def bce(logits, labels):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


def train_steps(model, emb, opt, batches) -> list[float]:
    """One process trains on whole batches as the continuous trainer does: forward,
    backward, the dense optimizer, then the collection's sparse step. Returns the losses."""
    losses = []
    for b in batches:
        opt.zero_grad()
        loss = bce(model(b.dense, b.sparse), b.labels)
        loss.backward()
        opt.step()
        emb.sparse_step()
        losses.append(float(loss.detach()))
    return losses


def reference_run(cfg, batches) -> dict:
    """Plain training in one process over the whole global batches, as the continuous
    trainer runs it: the fused collection and its sparse optimizer, the dense optimizer
    for the MLPs. Losses, final tables (fp32) and their optimizer state."""
    emb = fused_embeddings_from_config(cfg)
    model = DLRM.from_config(cfg, emb)
    losses = train_steps(model, emb, make_optimizer(cfg, model.parameters()), batches)
    tables = {n: w.float().clone() for n, w in emb.per_table_weights().items()}
    states = {}
    for t, start in zip(emb.tables, emb.table_starts):
        states[t.name] = {k: v[start:start + t.rows].clone() for k, v in emb.optimizer_state().items()}
    return {"losses": losses, "tables": tables, "states": states, "steps": int(emb.step)}


def sharded_worker(rank: int, world: int, init_file: str, out_dir: str, jobs: list[dict],
                   device: str = "cpu") -> None:
    """One rank: join the group once, then for each job build a sharded model for its plan,
    optionally load a sharded checkpoint, train ``steps`` batches (from ``first``) on this
    rank's slice of every global batch as the continuous trainer does (dense optimizer step,
    then the collection's ``sparse_step``), optionally save, and (rank 0) write
    ``<name>.pt`` with the mean losses, the reassembled tables and optimizer state, and the
    layout."""
    import torch.distributed as dist

    with rank_errors_to(out_dir, rank):
        from trainer.dist import init_process_group
        from trainer.planner import plan_from_config
        from trainer.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
        from trainer.sharding import build_sharded_embeddings, local_slice, wrap_data_parallel

        torch.set_num_threads(1)
        ctx = init_process_group(rank, world, "file://" + init_file, device=device, timeout_s=120)
        for job in jobs:
            cfg = job_cfg(job)
            plan = plan_from_config(cfg, world, "cpu")
            emb = build_sharded_embeddings(cfg, plan, ctx)
            model = wrap_data_parallel(DLRM.from_config(cfg, embeddings=emb).to(ctx.device), ctx)
            opt = make_optimizer(cfg, model.parameters())
            assert not list(emb.parameters()), "embeddings are trained by the sparse optimizer only"
            if job.get("load"):
                load_sharded_checkpoint(job["load"], model, opt)
            first = job.get("first", 0)
            n = job.get("batch", GLOBAL_BATCH)
            batches = make_batches(first + job.get("steps", STEPS), batch=n)[first:]
            lo, hi = ctx.slice_of(n)
            locals_ = [local_slice(b, lo, hi).to(ctx.device) for b in batches]
            losses = []
            for i, b in enumerate(locals_):
                if job.get("prefetch") and i == 0:
                    emb.prefetch(b.sparse)
                opt.zero_grad()
                # scaled so that unequal slices still average to the global-batch mean
                loss = bce(model(b.dense, b.sparse), b.labels) * ctx.loss_scale(n)
                if job.get("prefetch") and i + 1 < len(locals_):
                    emb.prefetch(locals_[i + 1].sparse)  # the next ids travel during this backward
                loss.backward()
                opt.step()
                emb.sparse_step()  # every table's touched rows (the loop does the same)
                mean = loss.detach().clone()  # sum over ranks of (W * local_n / n) * local mean
                dist.all_reduce(mean)
                losses.append(float(mean.cpu()) / world)
            if job.get("save"):
                save_sharded_checkpoint(job["save"], model, opt)
            tables = {n: emb.full_table(n) for n in TABLES}
            states = {n: {k: emb.full_table(n, state=k) for k in state_names(cfg)} for n in TABLES}
            layout = {t.name: t.sharding.value for t in plan.tables}
            if rank == 0:
                torch.save({"losses": losses, "tables": tables, "states": states, "layout": layout,
                            "steps": emb.sparse_steps},
                           os.path.join(out_dir, job["name"] + ".pt"))


def run_jobs(out, world: int, jobs: list[dict], device: str = "cpu") -> dict[str, dict]:
    """Run ``jobs`` on ``world`` spawned ranks (1 rank: in this process); results by name."""
    out.mkdir(exist_ok=True)
    init = str(out / f"init-{world}")
    if world == 1:
        sharded_worker(0, 1, init, str(out), jobs, device)
    else:
        try:
            mp.start_processes(sharded_worker, args=(world, init, str(out), jobs, device),
                               nprocs=world, join=True, start_method="spawn")
        except mp.ProcessRaisedException as exc:
            errors = "\n".join(p.read_text() for p in out.glob("error-*.txt"))
            raise AssertionError(f"a rank failed:\n{errors or exc}") from None
    return {j["name"]: torch.load(out / (j["name"] + ".pt"), weights_only=True) for j in jobs}


def assert_matches(result: dict, ref: dict, tol: float, *, first: int = 0, states: bool = True):
    """Losses of steps ``first..`` and final tables within ``tol``; optimizer state (when
    ``states``) within ``tol`` relative to its magnitude (sums of squares are ~1e-3)."""
    assert result["losses"] == pytest.approx(ref["losses"][first:], abs=tol), (result["losses"], ref["losses"])
    for name, want in ref["tables"].items():
        diff = (result["tables"][name] - want).abs().max().item()
        assert diff <= tol, f"table {name} ({result['layout'][name]}) differs by {diff}"
    if states:
        assert result["steps"] == ref["steps"]
        for name, want in ref["states"].items():
            for key, value in want.items():
                got = result["states"][name][key]
                assert got.shape == value.shape, (name, key)
                scale = max(value.abs().max().item(), 1e-12)
                diff = (got - value).abs().max().item()
                assert diff <= tol * scale, \
                    f"{key} of table {name} ({result['layout'][name]}) differs by {diff} (scale {scale})"


def reference(job: dict, **batch_kw) -> dict:
    return reference_run(job_cfg(job), make_batches(**batch_kw))


FIRST = 2  # steps before the checkpoint; STEPS - FIRST after it
TWO_TYPES = {"a": "table_wise", "b": "row_wise", "c": "column_wise", "d": "data_parallel"}
FOUR_TYPES = {"a": "table_row_wise", "b": "column_wise", "c": "row_wise", "d": "table_wise"}
FOUR_MORE = {"a": "data_parallel", "b": "table_wise", "c": "column_wise", "d": "row_wise"}
# two table-wise tables on 4 ranks: two ranks own no shard (they still send the weighted
# feature's ids and take part in every exchange); two replicated tables
IDLE_FOUR = {"a": "table_wise", "b": "table_wise", "c": "data_parallel", "d": "data_parallel"}
BF16_TYPES = {"a": "row_wise", "b": "table_wise", "c": "column_wise", "d": "table_wise"}
CKPT_FOUR = {"a": "table_row_wise", "b": "column_wise", "c": "row_wise", "d": "data_parallel"}
CKPT_TWO = {"a": "row_wise", "b": "table_wise", "c": "column_wise", "d": "table_wise"}

JOBS = {
    4: [
        {"name": "four", "forced": FOUR_TYPES, "devices_per_host": 2, "prefetch": True},
        {"name": "four_adagrad", "forced": FOUR_MORE, "sparse": "adagrad"},
        {"name": "four_idle", "forced": IDLE_FOUR, "prefetch": True},
        {"name": "ckpt_four", "forced": CKPT_FOUR, "devices_per_host": 2, "steps": FIRST, "save": "ckpt"},
        {"name": "ckpt_four_adam", "forced": FOUR_MORE, "sparse": "adam", "steps": FIRST, "save": "ckpt_adam"},
    ],
    2: [
        {"name": "two", "forced": TWO_TYPES},
        {"name": "two_sgd", "forced": TWO_TYPES, "sparse": "sgd"},
        {"name": "two_adam", "forced": TWO_TYPES, "sparse": "adam", "prefetch": True},
        {"name": "uneven", "forced": TWO_TYPES, "batch": GLOBAL_BATCH - 1, "prefetch": True},
        {"name": "bf16", "forced": BF16_TYPES, "precision": "bf16", "prefetch": True, "sparse": "sgd"},
        {"name": "bf16_rows", "forced": TWO_TYPES, "dtype": "bf16"},
        {"name": "ckpt_two", "forced": CKPT_TWO, "first": FIRST, "steps": STEPS - FIRST, "load": "ckpt"},
        {"name": "ckpt_two_adam", "forced": TWO_TYPES, "sparse": "adam", "first": FIRST,
         "steps": STEPS - FIRST, "load": "ckpt_adam"},
        {"name": "cached_two", "forced": {"a": "table_wise", "b": "row_wise", "c": "column_wise"},
         "sparse": "sgd", "row_cache": "rows", "steps": FIRST, "save": "ckpt_cached"},
    ],
    1: [
        {"name": "ckpt_one", "forced": {}, "first": FIRST, "steps": STEPS - FIRST, "load": "ckpt"},
        {"name": "cached_one", "forced": {}, "sparse": "sgd", "row_cache": "rows", "first": FIRST,
         "steps": STEPS - FIRST, "load": "ckpt_cached"},
    ],
}


def _placed(job: dict, out) -> dict:
    """``job`` with its directories under ``out``."""
    job = dict(job)
    for key in ("save", "load"):
        if key in job:
            job[key] = str(out / job[key])
    if "row_cache" in job:
        # table "a" lives on SSD behind a 20-row cache (40 rows: evictions every step)
        job["row_cache"] = {"enabled": True, "tables": ["a"], "cache_rows": 20, "optimizer": "sgd",
                            "path": str(out / job["row_cache"]), "fsync": False}
    return job


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    res = {}
    for world in (4, 2, 1):
        res.update(run_jobs(out, world, [_placed(j, out) for j in JOBS[world]]))
    res["ckpt_files"] = sorted(p.name for p in (out / "ckpt").iterdir())
    return res


def _job(name: str) -> dict:
    return next(j for jobs in JOBS.values() for j in jobs if j["name"] == name)


def test_two_ranks_each_sharding_type_matches_plain_training(results):
    ref = reference(_job("two"))
    res = results["two"]
    assert res["layout"] == TWO_TYPES
    # training moved the rows: the comparison is not between two untouched inits
    init = fused_embeddings_from_config(job_cfg(_job("two"))).per_table_weights()
    assert all((ref["tables"][n] - init[n]).abs().max() > 1e-3 for n in TABLES)
    assert_matches(res, ref, 1e-5)


def test_column_wise_rowwise_adagrad_sums_squares_over_the_full_dim(results):
    # Table "c" is split into two column shards on two ranks. Each row's accumulator must be
    # plain's (mean of g**2 over all 8 columns), not the mean over the shard's 4 columns,
    # which would differ from it by a factor of up to 2.
    ref = reference(_job("two"))
    got, want = results["two"]["states"]["c"]["state_sum"], ref["states"]["c"]["state_sum"]
    assert got.shape == (TABLES["c"],) and bool((want > 0).any())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name", ["two_sgd", "two_adam", "four_adagrad"])
def test_other_sparse_optimizers_match_plain_training(results, name):
    job = _job(name)
    res = results[name]
    assert res["layout"] == job["forced"]
    assert_matches(res, reference(job), 1e-5)


def test_unequal_rank_slices_match_plain_training(results):
    # 15 samples over 2 ranks: 8 and 7, exchanged with per-sender counts, losses scaled
    assert_matches(results["uneven"], reference(_job("uneven"), batch=GLOBAL_BATCH - 1), 1e-5)


def test_four_ranks_table_row_wise_and_pipelined_ids_match(results):
    res = results["four"]
    assert res["layout"] == FOUR_TYPES
    assert_matches(res, reference(_job("four")), 1e-5)


def test_four_ranks_replicated_tables_and_ranks_without_shards_match(results):
    res = results["four_idle"]
    assert res["layout"] == IDLE_FOUR
    assert_matches(res, reference(_job("four_idle")), 1e-5)


def test_bf16_exchange_stays_close(results):
    # SGD, not Adagrad: Adagrad's first step is lr * g / |g|, so a gradient of ~0 that bf16
    # rounding flips moves a row by 2 * lr; SGD keeps the error proportional to the rounding.
    ref = reference(_job("bf16"))
    res = results["bf16"]
    assert_matches(res, ref, 2e-2, states=False)
    # the wire really was bf16: results are close, not bit-identical
    assert max(abs(a - b) for a, b in zip(res["losses"], ref["losses"])) > 1e-7


def test_bf16_rows_match_a_bf16_plain_run(results):
    ref = reference(_job("bf16_rows"))
    res = results["bf16_rows"]
    assert res["layout"] == TWO_TYPES
    assert res["losses"] == pytest.approx(ref["losses"], abs=1e-3)
    for name, want in ref["tables"].items():
        got = res["tables"][name]
        assert torch.equal(got.bfloat16().float(), got)  # the rows really are bf16
        # the same random bits for the same row and column: almost every value is bitwise
        # plain's; a rounding tipped by a last-bit fp32 difference moves one bf16 step
        same = (got == want).float().mean().item()
        step = (want.abs() * 2.0 ** -7).clamp_min(2.0 ** -20)
        assert same > 0.97, f"table {name} ({res['layout'][name]}): only {same:.1%} bitwise equal"
        assert bool(((got - want).abs() <= 2 * step).all()), name
    assert_matches({**res, "tables": ref["tables"]}, ref, 1e-3)  # states and steps


def test_four_rank_checkpoint_resumes_on_two_and_one_rank(results):
    ref = reference(_job("ckpt_four"))
    assert results["ckpt_four"]["losses"] == pytest.approx(ref["losses"][:FIRST], abs=1e-5)
    assert results["ckpt_files"] == ["dense.pt", "manifest.json"] + [
        f"shards-rank{r:05d}-of-00004.pt" for r in range(4)]
    two = results["ckpt_two"]
    assert two["layout"] == CKPT_TWO  # row-wise -> column-wise, replicated -> table-wise, ...
    assert_matches(two, ref, 1e-5, first=FIRST)
    one = results["ckpt_one"]
    assert set(one["layout"].values()) <= {"table_wise", "data_parallel"}
    assert_matches(one, ref, 1e-5, first=FIRST)


def test_adam_state_and_step_reshard(results):
    # element-wise moments sliced like the weights, and the step count (bias correction)
    ref = reference(_job("ckpt_four_adam"))
    assert results["ckpt_four_adam"]["layout"] == FOUR_MORE
    assert_matches(results["ckpt_two_adam"], ref, 1e-5, first=FIRST)


def test_row_cached_table_in_a_sharded_model_trains_and_reshards(results):
    # table "a" lives on SSD behind a 20-row cache (40 rows: evictions every step) on its
    # owner; the row cache's SGD is the same update as the fused tables' SGD
    job = _job("cached_two")
    ref = reference_run(job_cfg({**job, "row_cache": None}), make_batches())
    mid = reference_run(job_cfg({**job, "row_cache": None}), make_batches(FIRST))
    two = results["cached_two"]
    assert two["layout"]["a"] == "table_wise"
    assert_matches(two, mid, 1e-5)
    one = results["cached_one"]  # saved by 2 ranks, resumed by 1
    assert_matches(one, ref, 1e-5, first=FIRST)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL); CPU runs use gloo above")
def test_one_gpu_rank_on_nccl_matches_plain_training(tmp_path):
    job = {"name": "gpu", "forced": {"a": "table_wise", "b": "table_wise", "c": "data_parallel", "d": "table_wise"},
           "prefetch": True}
    res = run_jobs(tmp_path, 1, [job], device="cuda")["gpu"]
    assert res["layout"] == job["forced"]
    assert_matches(res, reference(job), 1e-4)  # GPU kernels sum in another order
