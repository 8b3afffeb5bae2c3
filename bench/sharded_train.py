"""Samples/s of sharded DLRM training on 1, 2 and 4 gloo ranks (and on the GPU when one is
present), next to the plain single-process DLRM (every table in one fused collection, the
same sparse optimizer) measured in the same run.

    python bench/sharded_train.py [--ranks 1,2,4] [--sharding auto,row_wise] [--steps 20]
                                  [--sparse-optimizer rowwise_adagrad] [--json]

Each configuration trains the same synthetic global batches; every rank trains on its
``batch / ranks`` slice. Time is measured on rank 0 between two barriers after ``--warmup``
steps. Every process (baseline and each rank) runs ``--threads`` intra-op threads (default
1), so N ranks use N cores against the baseline's one; on a machine with fewer free cores
than ranks, more ranks mainly add contention: read the ratios, not the absolutes.
With ``--json`` the last line is ``{"results": [{"ranks", "sharding", "samples_per_s",
"device", "ratio_to_baseline"}], "baseline_samples_per_s", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import (  # noqa: E402
    ShardingType,
    config_from_dict,
)
from trainer.batch import Jagged, TrainBatch  # noqa: E402
from trainer.config import SparseOptimizerKind  # noqa: E402
from trainer.embedding import capabilities_of  # noqa: E402
from trainer.model import DLRM, fused_embeddings_from_config  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402

__all__ = ["main"]


def make_cfg(args, sharding: str):
    forced = {} if sharding == "auto" else {f"t{i}": sharding for i in range(args.tables)}
    return config_from_dict({
        "schema": {"dense": [{"name": f"x{i}"} for i in range(13)],
                   "sparse": [{"name": f"t{i}", "rows": args.rows, "multi": True, "max_values": 8}
                              for i in range(args.tables)]},
        "trainer": {"embedding_dim": args.dim, "bottom_mlp": [64, args.dim], "top_mlp": [64, 32],
                    "batch_size": args.batch_size, "sparse_optimizer": args.sparse_optimizer,
                    "dense_optimizer": "adagrad", "learning_rate": 0.05,
                    "batch_ramp_samples": 0},  # whole batches, like the plain baseline
        "sharding": {"enabled": True, "device": "cpu", "tables": forced, "data_parallel_max_bytes": 0},
        # the embedding tables' exchange alone, as before [model] existed (this bench builds
        # the model around one sharded collection)
        "model": {"wide": False, "normalize_dense": False},
    })


def make_batches(args, n: int) -> list[TrainBatch]:
    g = torch.Generator().manual_seed(0)
    B = args.batch_size
    out = []
    for _ in range(n):
        sparse = {}
        for i in range(args.tables):
            lens = torch.randint(1, 2 * args.pooling, (B,), generator=g)
            offsets = torch.zeros(B + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(lens, 0)
            sparse[f"t{i}"] = Jagged(torch.randint(0, args.rows, (int(offsets[-1]),), generator=g), offsets)
        out.append(TrainBatch(torch.randn(B, 13, generator=g), sparse,
                              torch.randint(0, 2, (B,), generator=g).float()))
    return out


def _train(model, emb, opt, batches, warmup: int, sync) -> float:
    """The continuous trainer's step: forward, backward, dense optimizer, sparse step."""
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    sparse_step = capabilities_of(emb).sparse_step
    for i, b in enumerate(batches):
        if i == warmup:
            sync()
            start = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(b.dense, b.sparse), b.labels).backward()
        opt.step()
        if sparse_step:
            emb.sparse_step()
    sync()
    return time.perf_counter() - start


def _dense_optimizer(cfg, model):
    return build_optimizer(cfg.trainer.dense_optimizer_kind, model.parameters(), cfg.trainer.dense_lr)


def baseline(args, device: str) -> float:
    """The plain model as the continuous trainer runs it: one process, every table in one
    ``FusedEmbeddingBagCollection`` trained by the sparse optimizer."""
    cfg = make_cfg(args, "auto")
    emb = fused_embeddings_from_config(cfg, device)
    model = DLRM.from_config(cfg, emb).to(device)
    opt = _dense_optimizer(cfg, model)
    batches = [b.to(device) for b in make_batches(args, args.warmup + args.steps)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return args.steps * args.batch_size / _train(model, emb, opt, batches, args.warmup, sync)


def _worker(rank: int, world: int, init: str, out: str, args, sharding: str, device: str) -> None:
    import torch.distributed as dist

    from trainer.dist import init_process_group
    from trainer.planner import plan_from_config
    from trainer.sharding import build_sharded_embeddings, local_slice, wrap_data_parallel

    torch.set_num_threads(args.threads)
    ctx = init_process_group(rank, world, "file://" + init, device=device, timeout_s=300)
    try:
        cfg = make_cfg(args, sharding)
        plan = plan_from_config(cfg, world, "cpu" if device == "cpu" else "h100")
        emb = build_sharded_embeddings(cfg, plan, ctx)
        model = wrap_data_parallel(DLRM.from_config(cfg, embeddings=emb).to(ctx.device), ctx)
        opt = _dense_optimizer(cfg, model)
        lo, hi = ctx.slice_of(args.batch_size)
        batches = [local_slice(b, lo, hi).to(ctx.device) for b in make_batches(args, args.warmup + args.steps)]

        def sync():
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()

        elapsed = _train(model, emb, opt, batches, args.warmup, sync)
        if rank == 0:
            with open(out, "w") as fh:
                json.dump({"elapsed_s": elapsed, "layout": {t.name: t.sharding.value for t in plan.tables}}, fh)
    finally:
        dist.destroy_process_group()


def sharded(args, world: int, sharding: str, device: str) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), out, args, sharding, device),
                           nprocs=world, join=True, start_method="spawn")
        with open(out) as fh:
            res = json.load(fh)
    return args.steps * args.batch_size / res["elapsed_s"], res["layout"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,4", help="comma-separated CPU rank counts")
    p.add_argument("--sharding", default="auto",
                   help="comma-separated: auto (the planner) or a sharding type for every table: "
                        + ", ".join(t.value for t in ShardingType))
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--pooling", type=int, default=4, help="mean ids per sample per table")
    p.add_argument("--sparse-optimizer", default=SparseOptimizerKind.ROWWISE_ADAGRAD.value,
                   choices=[k.value for k in SparseOptimizerKind],
                   help="the embeddings' optimizer, plain and sharded alike")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of every process (the baseline and each rank); more than "
                        "one per core oversubscribes a shared machine and swamps the measurement")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU measurement even if CUDA is present")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    shardings = args.sharding.split(",")
    for s in shardings:
        if s != "auto" and s not in {t.value for t in ShardingType}:
            p.error(f"--sharding {s!r}: expected auto or one of {[t.value for t in ShardingType]}")
    if any(args.batch_size % r for r in ranks):
        p.error(f"--batch-size {args.batch_size} must divide by every rank count {ranks}")

    torch.set_num_threads(args.threads)
    base = baseline(args, "cpu")
    print(f"baseline (plain fused DLRM, 1 process, cpu): {base:,.0f} samples/s", file=sys.stderr)
    results = []
    for sharding in shardings:
        for world in ranks:
            if world == 1 and sharding in ("row_wise", "column_wise", "table_row_wise"):
                continue  # needs 2+ ranks
            sps, layout = sharded(args, world, sharding, "cpu")
            results.append({"ranks": world, "sharding": sharding, "samples_per_s": sps, "device": "cpu",
                            "ratio_to_baseline": sps / base, "layout": layout})
            print(f"{world} cpu rank(s), {sharding}: {sps:,.0f} samples/s ({sps / base:.2f}x the first baseline)",
                  file=sys.stderr)
    # the baseline again after the sharded runs: on a shared machine the load drifts, so the
    # ratio uses the mean of both measurements (both are reported)
    base_after = baseline(args, "cpu")
    print(f"baseline again: {base_after:,.0f} samples/s", file=sys.stderr)
    mean_base = (base + base_after) / 2
    for r in results:
        r["ratio_to_baseline"] = r["samples_per_s"] / mean_base
    summary = {"results": results, "baseline_samples_per_s": mean_base,
               "baseline_runs_samples_per_s": [base, base_after],
               "config": {k: getattr(args, k) for k in ("tables", "rows", "dim", "pooling", "batch_size", "steps",
                                                        "sparse_optimizer")}}
    if torch.cuda.is_available() and not args.no_gpu:
        gbase = baseline(args, "cuda")
        sps, layout = sharded(args, 1, shardings[0], "cuda")
        results.append({"ranks": 1, "sharding": shardings[0], "samples_per_s": sps, "device": "cuda",
                        "ratio_to_baseline": sps / gbase, "layout": layout})
        summary["gpu_baseline_samples_per_s"] = gbase
        summary["gpu"] = torch.cuda.get_device_name(0)
        print(f"gpu: sharded {sps:,.0f} vs plain {gbase:,.0f} samples/s", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
