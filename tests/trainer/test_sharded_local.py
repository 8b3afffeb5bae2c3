"""Pieces of sharded training that need no second process: each rank's slice of a batch,
the torchrun environment, and a one-rank sharded collection against the plain (fused) one."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from engine.errors import TrainerError
from tests.trainer.test_sharded_train import (
    GLOBAL_BATCH,
    TABLES,
    bce,
    make_batches,
    make_cfg,
    make_optimizer,
    reference_run,
    train_steps,
)
from trainer.dist import DistContext, init_from_env, init_process_group
from trainer.model import DLRM, fused_embeddings_from_config
from trainer.planner import plan_from_config
from trainer.sharding import build_sharded_embeddings, local_slice

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def test_rank_slices_concatenate_back_to_the_batch():
    batch = make_batches(1)[0]
    parts = []
    for rank in range(4):
        ctx = DistContext(rank, 4, rank, 4, torch.device("cpu"), "gloo", True)
        parts.append(local_slice(batch, *ctx.slice_of(GLOBAL_BATCH)))
    assert torch.equal(torch.cat([p.dense for p in parts]), batch.dense)
    assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels)
    for name in TABLES:
        j = batch.sparse[name]
        assert torch.equal(torch.cat([p.sparse[name].values for p in parts]), j.values)
        lens = torch.cat([p.sparse[name].offsets.diff() for p in parts])
        assert torch.equal(lens, j.offsets.diff())
        assert all(int(p.sparse[name].offsets[0]) == 0 for p in parts)
    three = [DistContext(r, 3, r, 3, torch.device("cpu"), "gloo", True) for r in range(3)]
    assert [c.slice_of(16) for c in three] == [(0, 6), (6, 11), (11, 16)]
    # rank r's loss is scale_r * mean_r; DDP averages over 3 ranks: sum_r (n_r / 16) * mean_r
    assert [c.loss_scale(16) for c in three] == pytest.approx([3 * 6 / 16, 3 * 5 / 16, 3 * 5 / 16])
    assert three[0].loss_scale(15) == 1.0
    with pytest.raises(TrainerError, match="skip it"):
        three[0].slice_of(2)


def test_without_torchrun_environment_one_plain_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.initialized, ctx.backend) == (0, 1, False, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(TrainerError, match="torchrun"):
        init_from_env("cpu")


def test_one_rank_sharded_forward_equals_plain_collection(tmp_path):
    forced = {"a": "table_wise", "b": "table_wise", "c": "data_parallel", "d": "table_wise"}
    cfg = make_cfg(forced)
    ctx = init_process_group(0, 1, f"file://{tmp_path}/init")
    try:
        emb = build_sharded_embeddings(cfg, plan_from_config(cfg, 1, "cpu"), ctx)
        plain = fused_embeddings_from_config(cfg)
        assert list(emb.parameters()) == []  # rows are buffers of fused collections
        with torch.no_grad():
            for batch in make_batches(2):
                assert batch.sparse["b"].weights is not None
                got, want = emb(batch.sparse), plain(batch.sparse)
                assert got.shape == (GLOBAL_BATCH, len(TABLES), 8)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        with pytest.raises(TrainerError, match="lacks sparse feature"):
            emb({"a": batch.sparse["a"]})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sparse,dtype", [("rowwise_adagrad", "bf16"), ("adam", "fp32"), ("sgd", "fp16")])
def test_one_rank_sharded_training_is_bitwise_plain_training(tmp_path, sparse, dtype):
    """One rank, table-wise and replicated tables: the same gradients reach the same rows in
    the same order, so every update, 16-bit stochastic rounding included (plain training's
    random bits for the same row and column), is bitwise plain training's."""
    forced = {"a": "table_wise", "b": "table_wise", "c": "data_parallel", "d": "table_wise"}
    cfg = make_cfg(forced, sparse=sparse, dtype=dtype)
    ref = reference_run(cfg, make_batches())
    ctx = init_process_group(0, 1, f"file://{tmp_path}/init")
    try:
        emb = build_sharded_embeddings(cfg, plan_from_config(cfg, 1, "cpu"), ctx)
        model = DLRM.from_config(cfg, embeddings=emb)
        losses = train_steps(model, emb, make_optimizer(cfg, model.parameters()), make_batches())
        assert losses == ref["losses"] and emb.sparse_steps == ref["steps"] == len(losses)
        for name in TABLES:
            assert torch.equal(emb.full_table(name), ref["tables"][name]), name
            for key, want in ref["states"][name].items():
                assert torch.equal(emb.full_table(name, state=key), want), (name, key)
    finally:
        dist.destroy_process_group()


def test_measured_table_stats_from_batches():
    from trainer.sharding import measure_table_stats

    batches = make_batches(3)
    stats = measure_table_stats(batches)
    b_lens = torch.cat([x.sparse["b"].offsets.diff() for x in batches])
    assert stats["a"] == {"pooling_factor": 1.0, "access_frequency": 1.0}
    assert stats["b"]["access_frequency"] == pytest.approx(float((b_lens > 0).float().mean()))
    assert stats["b"]["pooling_factor"] == pytest.approx(float(b_lens.sum()) / int((b_lens > 0).sum()))
    with pytest.raises(TrainerError, match="no samples"):
        measure_table_stats([])


def _torchrun_main(out_path: str) -> None:
    """What ``headrace train`` does per rank under torchrun, in miniature: join from the
    environment, plan, build, train two steps on this rank's slices, report."""
    from trainer.sharding import wrap_data_parallel

    torch.set_num_threads(1)
    ctx = init_from_env("cpu", timeout_s=120)
    try:
        cfg = make_cfg({"a": "row_wise", "b": "column_wise"})
        emb = build_sharded_embeddings(cfg, plan_from_config(cfg, ctx.world_size, "cpu"), ctx)
        model = wrap_data_parallel(DLRM.from_config(cfg, embeddings=emb), ctx)
        opt = make_optimizer(cfg, model.parameters())
        losses = []
        for b in make_batches(2):
            local = local_slice(b, *ctx.slice_of(b.batch_size))
            opt.zero_grad()
            loss = bce(model(local.dense, local.sparse), local.labels) * ctx.loss_scale(b.batch_size)
            loss.backward()
            opt.step()
            emb.sparse_step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / ctx.world_size)
        if ctx.rank == 0:
            torch.save({"losses": losses, "world": ctx.world_size, "backend": ctx.backend}, out_path)
    finally:
        dist.destroy_process_group()


def test_torchrun_launch_trains_sharded(tmp_path):
    """``torchrun`` (torch.distributed.run) starts 2 ranks that join through the environment
    and train like one plain process on the whole batches."""
    out = tmp_path / "result.pt"
    code = ("import sys; from tests.trainer.test_sharded_local import _torchrun_main; "
            "_torchrun_main(sys.argv[1])")
    script = tmp_path / "main.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[2]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(out, weights_only=True)
    assert (res["world"], res["backend"]) == (2, "gloo")
    ref = reference_run(make_cfg({"a": "row_wise", "b": "column_wise"}), make_batches(2))
    assert res["losses"] == pytest.approx(ref["losses"], abs=1e-5)
