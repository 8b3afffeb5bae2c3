"""Export from sharded checkpoints of a 2-rank gloo job (two forked ranks, as TorchRec's
``MultiProcessTestBase`` runs them, each a ``DistributedTrainer``): every
table is gathered from both ranks' pieces (row-, table- and column-wise shards, and the
first-order part's shards), and the package, full and base + delta, predicts what the
trainer's own sharded model predicts after restoring the same checkpoint (in this process,
resharded onto one rank)."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

from engine.config import load_config, replace_in
from engine.export import export_package
from engine.serving import load_model
from storage.batch_cache import BatchCache
from tests.trainer.test_distributed_train import SIZES, config, fill_cache
from trainer.checkpoint import ShardedCheckpointManager
from trainer.data import BatchLayout, Piece, assemble
from trainer.dist import init_from_env, init_process_group
from trainer.distributed_loop import DistributedTrainer

# Multi-process: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

TOL = 1e-6


def _batches(cfg):
    with BatchCache.from_config(cfg.cache, readonly=True) as cache:
        cached = list(cache.iter_batches())
    return [assemble([Piece(cb, 0, cb.num_rows)], BatchLayout.from_config(cfg)) for cb in cached]


def _trainer_logits(cfg, checkpoint, batches) -> list[torch.Tensor]:
    """The trainer's own model (sharded collections, one rank: the planner's choice, as the
    2-rank types cannot be forced on one) restored from ``checkpoint``."""
    import torch.distributed as dist

    cfg = replace_in(cfg, "sharding", tables={})
    trainer = DistributedTrainer(cfg, cfg.cache.path, ctx=init_from_env("cpu"), max_batches=0)
    try:
        ShardedCheckpointManager(cfg.trainer.checkpoint_dir, cfg, rank=0).load(
            trainer.model, trainer.optimizer, trainer.metrics, checkpoint)
        trainer.model.eval()
        with torch.no_grad():
            return [trainer.model(b.dense, b.sparse) for b in batches]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank(cfg, rank: int, world: int, init_method: str) -> None:
    torch.set_num_threads(1)
    ctx = init_process_group(rank, world, init_method, device="cpu")
    try:
        DistributedTrainer(cfg, cfg.cache.path, ctx=ctx).run()
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_checkpoints_export_and_predict_like_the_trainer(tmp_path):
    cache = tmp_path / "cache"
    fill_cache(cache, 0, len(SIZES))
    path = config(tmp_path, "two", cache, 2)
    cfg = load_config(path)
    forked = mp.get_context("fork")  # no interpreter start-up per rank
    ranks = [forked.Process(target=_rank, args=(cfg, r, 2, f"file://{tmp_path}/pg")) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    assert [p.exitcode for p in ranks] == [0, 0]
    checkpoints = ShardedCheckpointManager(cfg.trainer.checkpoint_dir, cfg, rank=0).checkpoints()
    assert len(checkpoints) >= 2
    older, newest = str(checkpoints[-2]), str(checkpoints[-1])
    base = export_package(cfg, str(tmp_path / "base"), checkpoint=older, program=False)
    delta = export_package(cfg, str(tmp_path / "delta"), since=base["package"], program=False)
    assert delta["kind"] == "delta" and delta["trained_samples"] == sum(SIZES)
    batches = _batches(cfg)
    for package, checkpoint in ((base, older), (delta, newest)):
        model = load_model(package["package"]).serving_model
        want = _trainer_logits(cfg, checkpoint, batches)
        for b, ref in zip(batches, want):
            got = model.logits(b)
            np.testing.assert_allclose(torch.sigmoid(got).numpy(), torch.sigmoid(ref).numpy(), rtol=0, atol=TOL)
