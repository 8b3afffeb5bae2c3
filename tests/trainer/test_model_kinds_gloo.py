"""Every model kind trains on two gloo ranks (``DistributedTrainer``: sharded embedding and
first-order tables, DDP dense layers, the dense normaliser's statistics summed over the
ranks) exactly as one plain process trains it, and its sharded checkpoint (both sharded
collections) resumes on one rank under another plan.

Tolerance: the ranks only reorder fp32 sums (all-to-all, DDP all-reduce, the column shards'
sums of squares), so metrics agree to 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.trainer.rank_worker import rank_errors_to
from tests.trainer.test_distributed_train import SIZES, fill_cache
from tests.trainer.test_model_kinds import KINDS, make_cfg, run_sharded_one_rank
from trainer.loop import ContinuousTrainer

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

# one table per kind of placement two ranks allow; c's 1-wide first-order rows go table-wise
FORCED = {"u": "row_wise", "tags": "table_wise", "c": "column_wise"}
# replicated first-order rows: their gradients and per-lookup squares are all-reduced
REPLICATED = {"u": "table_wise", "tags": "data_parallel", "c": "table_wise"}
METRIC_TOL = 1e-5


def sharded_cfg(root, kind: str, tables: dict):
    return make_cfg(root, f"gloo-{kind}", kind, sharding={"enabled": True, "device": "cpu", "tables": tables})


def worker(rank: int, world: int, root: str, out: str) -> None:
    from pathlib import Path

    from trainer.dist import init_process_group
    from trainer.distributed_loop import DistributedTrainer

    with rank_errors_to(out, rank):
        torch.set_num_threads(1)
        ctx = init_process_group(rank, world, f"file://{out}/init", device="cpu", timeout_s=120)
        for kind in KINDS:
            summary = DistributedTrainer(sharded_cfg(Path(root), kind, FORCED), ctx=ctx).run()
            if rank == 0:
                torch.save({k: summary[k] for k in ("auc", "logloss", "trained_samples", "plan")},
                           os.path.join(out, f"{kind}.pt"))
        summary = DistributedTrainer(make_cfg(Path(root), "gloo-replicated", "linear", sharding={
            "enabled": True, "device": "cpu", "tables": REPLICATED}), ctx=ctx).run()
        if rank == 0:
            torch.save({k: summary[k] for k in ("auc", "logloss", "plan")}, os.path.join(out, "replicated.pt"))


def test_kinds_on_two_gloo_ranks_train_like_one_process_and_reshard(tmp_path):
    fill_cache(tmp_path / "cache", 0, len(SIZES))
    out = tmp_path / "out"
    out.mkdir()
    try:
        mp.start_processes(worker, args=(2, str(tmp_path), str(out)), nprocs=2, join=True, start_method="spawn")
    except mp.ProcessRaisedException as exc:
        errors = "\n".join(p.read_text() for p in out.glob("error-*.txt"))
        raise AssertionError(f"a rank failed:\n{errors or exc}") from None
    for kind in KINDS:
        got = torch.load(out / f"{kind}.pt", weights_only=True)
        assert got["plan"] == {"u": "row_wise", "tags": "table_wise", "c": "column_wise"}
        ref = ContinuousTrainer(make_cfg(tmp_path, f"plain-{kind}", kind)).run()
        assert got["trained_samples"] == ref["trained_samples"] == sum(SIZES)
        assert got["logloss"] == pytest.approx(ref["logloss"], abs=METRIC_TOL), kind
        assert got["auc"] == pytest.approx(ref["auc"], abs=METRIC_TOL), kind
        if kind == "linear":
            replicated = torch.load(out / "replicated.pt", weights_only=True)
            assert replicated["plan"] == REPLICATED
            assert replicated["logloss"] == pytest.approx(ref["logloss"], abs=METRIC_TOL)
            assert replicated["auc"] == pytest.approx(ref["auc"], abs=METRIC_TOL)
    # one rank, the planner's own layout: the 2-rank checkpoint of both sharded collections
    # (embeddings and first-order rows) reshards (the layout is the same for every kind)
    _, _, resumed = run_sharded_one_rank(sharded_cfg(tmp_path, "dlrm", {}))
    assert resumed["resumed_from"] and resumed["trained_samples"] == 0
    assert resumed["total_trained_samples"] == sum(SIZES) and resumed["world_size"] == 1
