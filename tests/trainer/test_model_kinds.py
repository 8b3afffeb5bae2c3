"""Model kinds ([model] kind = dlrm | dcn_v2 | linear) and the first-order part train alike
plain, row-cached and sharded (one rank here; two gloo ranks in test_model_kinds_gloo.py);
the first-order part learns a planted first-order signal; warmup and clipping do what the
config says, across a resume too; checkpoints from before [model] load or fail clearly.

Data: the planted rows of test_distributed_train (a click logit of 1.2 * x1 plus +-1.5 by
the parity of u's row), 514 rows in 10 cached batches, trained in batches of 64.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engine.config import config_from_dict
from engine.errors import CheckpointError, ConfigError
from tests.trainer.test_distributed_train import MAP_BYTES, SIZES, TABLES, fill_cache
from trainer.batch import Jagged
from trainer.config import (
    LINEAR_FIRST_ORDER_LR, WIDE_FIRST_ORDER_LR, Accumulator, ModelConfig, ModelKind, SparseOptimizerKind,
)
from trainer.dist import init_from_env
from trainer.distributed_loop import DistributedTrainer
from trainer.embedding import RowInit, TableSpec, collections_of
from trainer.first_order import dense_param_groups, first_order_plan, first_order_spec, first_order_tables
from trainer.fused_embedding import FusedEmbeddingBagCollection
from trainer.loop import ContinuousTrainer
from trainer.model import build_model, fused_embeddings_from_config, model_shape
from trainer.planner import plan_from_config
from trainer.sparse_optim import SparseOptimizerSpec
from trainer.stability import Warmup, clip_dense_gradients

KINDS = ("dlrm", "dcn_v2", "linear")
BATCH = 64


def make_cfg(tmp_path, name: str, kind: str = "dlrm", *, trainer: dict | None = None, **sections):
    doc = {
        "schema": {"label": "label", "dense": [{"name": "x1"}, {"name": "x2"}],
                   "sparse": [{"name": n, "rows": r, "multi": n == "tags"} for n, r in TABLES.items()]},
        "cache": {"path": str(tmp_path / "cache"), "map_size_bytes": MAP_BYTES},
        "trainer": {"embedding_dim": 8, "bottom_mlp": [8, 8], "top_mlp": [8], "batch_size": BATCH, "seed": 5,
                    "checkpoint_dir": str(tmp_path / f"{name}-ckpt"), "metrics_window": 1000,
                    "device": "cpu", "threads": 1, "warmup_steps": 3, "clip_grad_norm": 0.5,
                    **(trainer or {})},
        "model": {"kind": kind, "cross_layers": 2, "cross_rank": 4},
        **sections,
    }
    return config_from_dict(doc)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    fill_cache(root / "cache", 0, len(SIZES))
    return root


def probe_batch() -> tuple[torch.Tensor, dict[str, Jagged]]:
    g = torch.Generator().manual_seed(3)
    n = 12
    lens = torch.randint(0, 4, (n,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    one = torch.arange(n + 1)
    sparse = {"u": Jagged(torch.randint(0, TABLES["u"], (n,), generator=g), one),
              "tags": Jagged(torch.randint(0, TABLES["tags"], (int(offsets[-1]),), generator=g), offsets),
              "c": Jagged(torch.randint(0, TABLES["c"], (n,), generator=g), one)}
    return torch.randn(n, 2, generator=g), sparse


def scores(trainer: ContinuousTrainer) -> torch.Tensor:
    dense, sparse = probe_batch()
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(dense, sparse)


def run_sharded_one_rank(cfg) -> tuple[dict, torch.Tensor, dict]:
    """A one-rank sharded trainer (its own one-process gloo group, destroyed after), its
    scores on the probe batch, and a resume of its checkpoint with nothing left to train."""
    try:
        trainer = DistributedTrainer(cfg, ctx=init_from_env("cpu"))
        summary = trainer.run()
        probe = scores(trainer)
        again = DistributedTrainer(cfg, ctx=init_from_env("cpu")).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return summary, probe, again


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_alike_plain_row_cached_and_sharded(cached, kind):
    runs = {}
    plain = make_cfg(cached, f"plain-{kind}", kind)
    trainer = ContinuousTrainer(plain)
    runs["plain"] = (trainer.run(), scores(trainer), ContinuousTrainer(plain).run())
    rc = {"enabled": True, "path": str(cached / f"rows-{kind}"), "cache_rows": 36, "fsync": False}
    row_cached = make_cfg(cached, f"rows-{kind}", kind, row_cache=rc)
    trainer = ContinuousTrainer(row_cached)
    assert {type(c).__name__ for c in trainer.collections} == {"CachedEmbeddingBagCollection"}
    runs["row_cached"] = (trainer.run(), scores(trainer), ContinuousTrainer(row_cached).run())
    runs["sharded"] = run_sharded_one_rank(
        make_cfg(cached, f"sharded-{kind}", kind, sharding={"enabled": True, "device": "cpu"}))

    ref_summary, ref_scores, _ = runs["plain"]
    assert ref_summary["trained_samples"] == sum(SIZES) and ref_summary["auc"] > 0.6
    for name, (summary, probe, resumed) in runs.items():
        assert summary["logloss"] == pytest.approx(ref_summary["logloss"], abs=1e-6), name
        assert summary["auc"] == pytest.approx(ref_summary["auc"], abs=1e-6), name
        torch.testing.assert_close(probe, ref_scores, rtol=0, atol=1e-5, msg=name)
        # the checkpoint (every collection of the kind) restores; nothing is left to train
        assert resumed["resumed_from"] and resumed["trained_samples"] == 0, name
        assert resumed["total_trained_samples"] == sum(SIZES), name


def test_kinds_declare_their_collections_and_shapes(cached):
    names = {kind: sorted(collections_of(build_model(make_cfg(cached, "x", kind)))) for kind in KINDS}
    assert names == {"dlrm": ["embeddings", "first_order.embeddings"],
                     "dcn_v2": ["embeddings", "first_order.embeddings"],
                     "linear": ["first_order.embeddings"]}
    no_wide = build_model(make_cfg(cached, "x", model={"kind": "dlrm", "wide": False}))
    assert no_wide.first_order is None and sorted(collections_of(no_wide)) == ["embeddings"]
    dense, sparse = probe_batch()
    for structure in ("stacked", "parallel"):
        for rank in (0, 4):
            cfg = make_cfg(cached, "x", model={"kind": "dcn_v2", "cross_structure": structure, "cross_rank": rank})
            assert build_model(cfg)(dense, sparse).shape == (12,)
    assert model_shape(make_cfg(cached, "x", "linear"))["sparse"] == [["u", 40, 1], ["tags", 12, 1], ["c", 20, 1]]
    with pytest.raises(ConfigError, match="cross_layers"):
        make_cfg(cached, "x", model={"cross_layers": 0})
    with pytest.raises(ConfigError, match="first_order_learning_rate"):
        make_cfg(cached, "x", model={"first_order_learning_rate": -1.0})
    with pytest.raises(ConfigError, match="warmup_steps"):
        make_cfg(cached, "x", trainer={"warmup_steps": -1})
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        make_cfg(cached, "x", trainer={"clip_grad_norm": float("inf")})


def test_first_order_part_learns_the_planted_first_order_signal(cached):
    """u's even rows raise the click logit by 1.5, odd rows lower it: the linear kind's 1-wide
    rows of u (zero at start) take those signs, and c (no signal) stays near zero."""
    trainer = ContinuousTrainer(make_cfg(cached, "planted", "linear"))
    summary = trainer.run()
    weights = trainer.model.first_order.embeddings.per_table_weights()
    u = weights["u"].flatten()
    signs = torch.where(torch.arange(TABLES["u"]) % 2 == 0, 1.0, -1.0)
    assert float((torch.sign(u) == signs).float().mean()) >= 0.9
    assert float(u[0::2].mean() - u[1::2].mean()) > 0.5
    assert float(weights["c"].abs().mean()) < 0.5 * float(u.abs().mean())
    assert summary["auc"] > 0.7


def test_warmup_ramps_the_deep_learning_rates_and_resumes_the_ramp(cached):
    """warmup_steps = 4: step s trains at (s + 1) / 4 of the dense and embedding rates; the
    first-order part (dense group and 1-wide rows) at its full rate from the first step; a
    resumed run continues the ramp where the checkpoint left it."""
    cfg = make_cfg(cached, "warmup", trainer={"warmup_steps": 4, "dense_learning_rate": 0.2,
                                             "sparse_learning_rate": 0.08},
                   model={"kind": "dlrm", "first_order_learning_rate": 0.3})
    first = ContinuousTrainer(cfg, max_batches=2)
    first.run()
    deep, first_order = first.optimizer.param_groups
    assert deep["lr"] == pytest.approx(0.2 * 2 / 4) and first_order["lr"] == pytest.approx(0.3)
    assert first.model.embeddings._step_spec.learning_rate == pytest.approx(0.08 * 2 / 4)
    assert first.model.first_order.embeddings._step_spec.learning_rate == pytest.approx(0.3)
    resumed = ContinuousTrainer(cfg, max_batches=1)
    resumed.run()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 3 / 4)
    assert resumed.model.embeddings._step_spec.learning_rate == pytest.approx(0.08 * 3 / 4)
    done = ContinuousTrainer(cfg)
    done.run()
    assert done.optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert done.model.embeddings._step_spec.learning_rate == pytest.approx(0.08)


def test_warmup_scales_the_sparse_step():
    """The first row-wise Adagrad step moves a row by lr * g / |g| per coordinate: a quarter
    of it at step 0 of a 4-step warmup."""
    def first_step(scale: float) -> torch.Tensor:
        emb = FusedEmbeddingBagCollection([TableSpec("u", 4, 2)], learning_rate=0.1)
        before = emb.weights.clone()
        Warmup(4, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), [emb]).apply(round(scale * 4) - 1)
        emb({"u": Jagged(torch.tensor([1]), torch.tensor([0, 1]))}).sum().backward()
        emb.sparse_step()
        return (emb.weights - before)[1]

    torch.testing.assert_close(first_step(0.25), first_step(1.0) / 4)


def _adagrad_step(accumulator: Accumulator, ids, offsets, weights, upstream) -> FusedEmbeddingBagCollection:
    """One row-wise Adagrad step (lr 0.1) of 1-wide zero rows: bags ``ids``/``offsets`` (per
    lookup ``weights``), d(loss)/d(bag) ``upstream``."""
    emb = FusedEmbeddingBagCollection(
        [TableSpec("u", 4, 1, RowInit.ZEROS)],
        optimizer=SparseOptimizerSpec(SparseOptimizerKind.ROWWISE_ADAGRAD, 0.1, accumulator=accumulator))
    pooled = emb({"u": Jagged(torch.tensor(ids), torch.tensor(offsets), weights)})
    (pooled.squeeze(2).squeeze(1) * upstream).sum().backward()
    emb.sparse_step()
    return emb


def test_per_lookup_accumulator_is_per_coordinate_adagrad_on_each_lookup():
    """Each id once per batch: the per-lookup accumulator is the batch one, i.e. online
    per-coordinate Adagrad (state g**2, step -lr*g/|g|). Repeated and weighted lookups add
    the sum of their squared gradients (w_k * g_i)**2, not the squared sum."""
    g = torch.tensor([0.3, -0.2, 0.05])
    once = [_adagrad_step(a, [2, 0, 3], [0, 1, 2, 3], None, g) for a in Accumulator]
    assert torch.equal(once[0].weights, once[1].weights) and torch.equal(once[0].state_sum, once[1].state_sum)
    assert once[1].state_sum[[2, 0, 3]].tolist() == pytest.approx((g ** 2).tolist())
    assert once[1].weights[[2, 0, 3], 0].tolist() == pytest.approx((-0.1 * g.sign()).tolist())

    w = torch.tensor([2.0, 1.0, 0.5, 1.0])  # id 1 in every bag, twice in bag 0 counting id 2
    emb = _adagrad_step(Accumulator.PER_LOOKUP, [1, 2, 1, 1], [0, 2, 3, 4], w, g)
    grad = 2.0 * g[0] + 0.5 * g[1] + g[2]
    squares = (2.0 * g[0]) ** 2 + (0.5 * g[1]) ** 2 + g[2] ** 2
    assert float(emb.state_sum[1]) == pytest.approx(float(squares))
    assert float(emb.weights[1, 0]) == pytest.approx(float(-0.1 * grad / squares.sqrt()))
    batch = _adagrad_step(Accumulator.BATCH, [1, 2, 1, 1], [0, 2, 3, 4], w, g)
    assert float(batch.state_sum[1]) == pytest.approx(float(grad ** 2))


def test_first_order_rate_and_accumulator_reach_the_placed_rows(cached):
    """Unset, the first-order rate is the kind's (larger alone than beside a deep part); the
    factories build the first-order rows with it and the per-lookup accumulator, while the
    embedding tables keep the [trainer] rate and the batch accumulator."""
    for kind, lr in (("linear", LINEAR_FIRST_ORDER_LR), ("dlrm", WIDE_FIRST_ORDER_LR), ("dcn_v2", WIDE_FIRST_ORDER_LR)):
        cfg = make_cfg(cached, "x", kind)
        rows = fused_embeddings_from_config(first_order_spec(cfg), tables=first_order_tables(cfg))
        assert rows.optimizer.learning_rate == lr and rows.optimizer.accumulator is Accumulator.PER_LOOKUP
        model = build_model(cfg, None if kind == "linear" else fused_embeddings_from_config(cfg))
        assert dense_param_groups(model, cfg)[1]["lr"] == lr
        if kind != "linear":  # rows built beside fused embeddings (first_order_like)
            assert model.first_order.embeddings.optimizer.learning_rate == lr
            assert model.first_order.embeddings.optimizer.accumulator is Accumulator.PER_LOOKUP
    assert fused_embeddings_from_config(cfg).optimizer.accumulator is Accumulator.BATCH
    cfg = make_cfg(cached, "x", "linear", model={"first_order_learning_rate": 0.3, "first_order_accumulator": "batch"})
    assert first_order_spec(cfg).trainer.sparse_lr == 0.3
    assert first_order_spec(cfg).trainer.sparse_accumulator is Accumulator.BATCH


def test_clipping_bounds_the_dense_gradient_norm_and_runs_in_the_loop(cached):
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    emb = torch.nn.EmbeddingBag(5, 2, sparse=True)
    emb(torch.tensor([1, 2]), torch.tensor([0])).sum().backward()
    sparse_grad = emb.weight.grad.clone()
    assert float(clip_dense_gradients([w, emb.weight], 1.0)) == pytest.approx(5.0)
    torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8, 0.0]))
    assert torch.equal(emb.weight.grad.to_dense(), sparse_grad.to_dense())  # sparse: untouched
    assert clip_dense_gradients([w], 0.0) is None
    # plain SGD moves the MLP by lr * grad: a tiny bound leaves it almost where it started
    moved = {}
    for bound in (0.0, 1e-6):
        cfg = make_cfg(cached, f"clip-{bound}", trainer={"dense_optimizer": "sgd", "warmup_steps": 0,
                                                        "clip_grad_norm": bound})
        trainer = ContinuousTrainer(cfg, max_batches=3)
        start = trainer.model.top[0].weight.detach().clone()
        trainer.run()
        moved[bound] = float((trainer.model.top[0].weight.detach() - start).abs().max())
    assert moved[1e-6] < 1e-5 < moved[0.0]


def test_a_checkpoint_from_before_model_kinds_loads_without_the_first_order_part(cached):
    """Checkpoints written before [model] record no kind: they are DLRMs without the
    first-order part, which resume with wide = false, and fail clearly otherwise."""
    legacy_model = {"kind": "dlrm", "wide": False, "normalize_dense": False, "interaction": "dot"}
    cfg = make_cfg(cached, "legacy", model=legacy_model)
    ContinuousTrainer(cfg, max_batches=2).run()
    path = next((cached / "legacy-ckpt").glob("ckpt-*.pt"))
    blob = torch.load(path, weights_only=True)
    for key in ("kind", "wide", "normalize_dense", "interaction"):
        del blob["model_shape"][key]
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"before \[model\] existed.*wide = false and interaction = \"dot\""):
        ContinuousTrainer(make_cfg(cached, "legacy")).run()
    assert ContinuousTrainer(cfg, max_batches=1).run()["resumed_from"] == str(path)


def test_a_dlrm_checkpoint_from_before_the_interaction_option_resumes_as_dot(cached):
    """DLRM checkpoints written before [model] interaction record none: their top MLP read the
    dots alone, so they resume with interaction = "dot" and fail under the new default
    ("dot_concat") with an error that says which key to set."""
    dot = {"kind": "dlrm", "interaction": "dot"}
    cfg = make_cfg(cached, "pre-interaction", model=dot)
    ContinuousTrainer(cfg, max_batches=2).run()
    path = next((cached / "pre-interaction-ckpt").glob("ckpt-*.pt"))
    blob = torch.load(path, weights_only=True)
    del blob["model_shape"]["interaction"]
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"interaction: checkpoint 'dot' vs config 'dot_concat'.*"
                                              r"resume it with \[model\] interaction = \"dot\""):
        ContinuousTrainer(make_cfg(cached, "pre-interaction", model={"kind": "dlrm"})).run()
    assert ContinuousTrainer(cfg, max_batches=1).run()["resumed_from"] == str(path)


def test_first_order_plan_follows_the_embedding_plan(cached):
    cfg = make_cfg(cached, "plan", sharding={"enabled": True, "device": "cpu",
                                             "tables": {"u": "row_wise", "tags": "table_wise", "c": "column_wise"}})
    plan = plan_from_config(cfg, 2, "cpu")
    wide = first_order_plan(plan)
    for tp, fp in zip(plan.tables, wide.tables):
        assert (fp.name, fp.rows, fp.dim) == (tp.name, tp.rows, 1)
        assert all((s.col_start, s.col_end) == (0, 1) for s in fp.shards)
        if tp.name == "c":  # a 1-wide table cannot be split by columns: whole, on the first block's rank
            first = min(tp.shards, key=lambda s: s.col_start)
            assert fp.sharding.value == "table_wise" and [s.rank for s in fp.shards] == [first.rank]
        else:
            assert fp.sharding is tp.sharding
            assert [(s.rank, s.row_start, s.row_end) for s in fp.shards] == \
                [(s.rank, s.row_start, s.row_end) for s in tp.shards]
    assert ModelConfig().kind is ModelKind.DLRM and ModelConfig().wide
