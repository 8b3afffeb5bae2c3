"""Benchmark: SSD row cache vs the whole table in memory, on Zipf-distributed ids.

Each table is ``--cache-ratio`` (default 8) times larger than its cache. Both models are
the same (sum-pooled bags, a small MLP head, row-wise Adagrad on the rows, SGD on the head)
and train on the same pre-generated batches, so the only difference is where rows live.
The in-memory baseline is measured in the same run, interleaved with the cached one; the
figure is the ratio (target: cached >= 0.5 x in-memory). The row store lives in ``--dir``
(a fresh temporary directory under /tmp by default) with fsync on, as in production.

Usage:
    python bench/row_cache.py [--rows 1000000] [--policy lru,lfu] [--device auto] [--json]

With ``--json`` the last line is ``{"results": [{"policy", "hit_rate", "samples_per_s",
"in_memory_samples_per_s", "ratio", ...}, ...], ...}``. Progress goes to stderr.

The two models alternate in chunks of ``--chunk`` steps over the same batches, so load
from other processes on a shared machine slows both alike; ``ratio`` is the median of the
per-chunk-pair ratios (``ratio_of_totals`` is the plain quotient of the two throughputs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import RowCachePolicy, RowOptimizerKind  # noqa: E402
from trainer.batch import Jagged  # noqa: E402
from trainer.cached_embedding import CachedEmbeddingBagCollection, open_row_store  # noqa: E402
from trainer.embedding import EmbeddingBagCollection, TableSpec  # noqa: E402
from trainer.row_optim import RowWiseOptimizer  # noqa: E402

__all__ = ["main"]

LR = 0.05


def zipf_batches(tables: list[TableSpec], steps: int, batch: int, bag: int, exponent: float,
                 seed: int) -> list[tuple[dict[str, Jagged], torch.Tensor]]:
    """``steps`` batches; each table's ids follow Zipf(``exponent``) over its rows, the hot
    ids scattered over the table by a fixed permutation."""
    rng = np.random.default_rng(seed)
    samplers = []
    for t in tables:
        cdf = np.cumsum(1.0 / np.arange(1, t.rows + 1, dtype=np.float64) ** exponent)
        samplers.append((cdf / cdf[-1], rng.permutation(t.rows)))
    offsets = torch.arange(0, batch * bag + 1, bag)
    out = []
    for _ in range(steps):
        sparse = {}
        for t, (cdf, perm) in zip(tables, samplers):
            ranks = np.minimum(np.searchsorted(cdf, rng.random(batch * bag)), t.rows - 1)
            sparse[t.name] = Jagged(torch.from_numpy(perm[ranks]), offsets)
        out.append((sparse, torch.from_numpy((rng.random(batch) < 0.25).astype(np.float32))))
    return out


def make_head(num_tables: int, dim: int, device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(num_tables * dim, 128), nn.ReLU(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)


@torch.no_grad()
def sgd(head: nn.Module) -> None:
    for p in head.parameters():
        p -= LR * p.grad


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class InMemoryModel:
    """The plain collection (whole tables in memory), row-wise Adagrad over sparse gradients."""

    def __init__(self, tables, device):
        self.device = device
        self.ebc = EmbeddingBagCollection(tables, seed=0).to(device)
        for bag in self.ebc.bags.values():
            bag.sparse = True
        self.head = make_head(len(tables), tables[0].dim, device)
        self.opt = RowWiseOptimizer([self.ebc.bags[t.name] for t in tables],
                                    RowOptimizerKind.ROWWISE_ADAGRAD, lr=LR)

    def step(self, sparse, labels, upcoming) -> None:
        sparse = {k: v.to(self.device) for k, v in sparse.items()}
        loss = nn.functional.binary_cross_entropy_with_logits(
            self.head(self.ebc(sparse)).squeeze(1), labels.to(self.device))
        self.head.zero_grad()
        self.opt.zero_grad()
        loss.backward()
        sgd(self.head)
        self.opt.step()

    def close(self) -> None:
        pass


class CachedModel:
    """The same model over the SSD row store with a cache of ``cache_rows`` rows per table."""

    def __init__(self, tables, policy, cache_rows, store_dir, device, prefetch):
        self.device = device
        self.store = open_row_store(store_dir, tables, RowOptimizerKind.ROWWISE_ADAGRAD, seed=0, sync=True)
        self.ebc = CachedEmbeddingBagCollection(tables, self.store, cache_rows=cache_rows, policy=policy,
                                                learning_rate=LR, device=device, prefetch=prefetch)
        self.head = make_head(len(tables), tables[0].dim, device)

    def step(self, sparse, labels, upcoming) -> None:
        pooled = self.ebc(sparse)
        if upcoming is not None:
            self.ebc.prefetch(upcoming)  # overlaps this step
        loss = nn.functional.binary_cross_entropy_with_logits(
            self.head(pooled).squeeze(1), labels.to(self.device))
        self.head.zero_grad()
        loss.backward()
        sgd(self.head)
        self.ebc.sparse_step()

    def close(self) -> None:
        self.ebc.close()


def timed_chunk(model, chunk, device) -> float:
    """Seconds to train ``chunk``; the next-batch prefetch stays inside the chunk, so no
    background work of one model overlaps the other model's timed steps."""
    _sync(device)
    started = time.perf_counter()
    for i, (sparse, labels) in enumerate(chunk):
        model.step(sparse, labels, chunk[i + 1][0] if i + 1 < len(chunk) else None)
    _sync(device)
    return time.perf_counter() - started


def compare(tables, batches, warmup: int, chunk_steps: int, policy: RowCachePolicy, cache_rows: int,
            store_dir: str, device, prefetch: bool) -> dict:
    """Train both models on the same batches, alternating chunks of ``chunk_steps`` so that
    load from other processes hits both alike; the first ``warmup`` steps are not timed."""
    plain = InMemoryModel(tables, device)
    cached = CachedModel(tables, policy, cache_rows, store_dir, device, prefetch)
    try:
        t_plain = t_cached = 0.0
        chunk_ratios = []
        base = None
        for start in range(0, len(batches), chunk_steps):
            if start == warmup:
                base = dataclass_copy(cached.ebc.stats)
            chunk = batches[start:start + chunk_steps]
            a, b = timed_chunk(plain, chunk, device), timed_chunk(cached, chunk, device)
            if start >= warmup:
                t_plain, t_cached = t_plain + a, t_cached + b
                chunk_ratios.append(a / b)
        steps = len(batches) - warmup
        samples = steps * batches[0][1].numel()
        s = cached.ebc.stats
        lookups, hits = s.lookups - base.lookups, s.hits - base.hits
        return {
            "policy": policy.value,
            "hit_rate": hits / lookups,
            "samples_per_s": samples / t_cached,
            "in_memory_samples_per_s": samples / t_plain,
            # Median over chunk pairs: a burst of load from other processes during one chunk
            # moves it little. ratio_of_totals is samples_per_s / in_memory_samples_per_s.
            "ratio": float(np.median(chunk_ratios)),
            "ratio_of_totals": t_plain / t_cached,
            "bytes_read_per_step": (s.bytes_read - base.bytes_read) / steps,
            "bytes_written_per_step": (s.bytes_written - base.bytes_written) / steps,
            "store_wait_ms_per_step": 1e3 * (s.store_wait_s - base.store_wait_s) / steps,
            "prefetched_fraction": (s.prefetched_rows - base.prefetched_rows) / max(1, lookups - hits),
            "store_disk_bytes": sum(cached.store.disk_bytes(t.name) for t in tables),
        }
    finally:
        cached.close()
        plain.close()


def dataclass_copy(stats):
    return type(stats)(**{k: getattr(stats, k) for k in stats.__dataclass_fields__})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="rows per table")
    p.add_argument("--tables", type=int, default=2)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--bag", type=int, default=4, help="ids per sample per table")
    p.add_argument("--cache-ratio", type=float, default=8.0, help="table rows / cache rows")
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--steps", type=int, default=100, help="measured steps per policy")
    p.add_argument("--warmup", type=int, default=40, help="unmeasured steps first (fill the cache)")
    p.add_argument("--chunk", type=int, default=10, help="steps per alternation between the models")
    p.add_argument("--policy", default="lru,lfu")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dir", default="", help="row store parent directory (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tables = [TableSpec(f"t{i}", args.rows, args.dim) for i in range(args.tables)]
    cache_rows = max(1, int(args.rows / args.cache_ratio))
    policies = [RowCachePolicy(x) for x in args.policy.split(",")]
    print(f"generating {args.warmup + args.steps} batches of {args.batch} ...", file=sys.stderr)
    if args.warmup % args.chunk or args.steps % args.chunk:
        p.error("--warmup and --steps must be multiples of --chunk")
    batches = zipf_batches(tables, args.warmup + args.steps, args.batch, args.bag, args.zipf, seed=1)
    parent = tempfile.mkdtemp(prefix="headrace-bench-rows-", dir=args.dir or None)
    results = []
    try:
        for policy in policies:
            r = compare(tables, batches, args.warmup, args.chunk, policy, cache_rows,
                        os.path.join(parent, policy.value), device, not args.no_prefetch)
            print(f"{policy.value}: hit rate {r['hit_rate']:.3f}, {r['samples_per_s']:,.0f} samples/s vs "
                  f"in-memory {r['in_memory_samples_per_s']:,.0f}, ratio {r['ratio']:.2f}, "
                  f"store wait {r['store_wait_ms_per_step']:.2f} ms/step",
                  file=sys.stderr)
            results.append(r)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    summary = {"results": results, "device": device, "rows_per_table": args.rows,
               "cache_rows_per_table": cache_rows, "tables": args.tables, "dim": args.dim,
               "batch": args.batch, "zipf": args.zipf, "torch_threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(summary))
    else:
        for r in results:
            print(f"{r['policy']}: hit_rate={r['hit_rate']:.3f} samples/s={r['samples_per_s']:,.0f} "
                  f"in-memory={r['in_memory_samples_per_s']:,.0f} ratio={r['ratio']:.2f}")
    return summary


if __name__ == "__main__":
    main()
