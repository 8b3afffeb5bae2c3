"""Trainer-step throughput: headrace's DLRM (fused tables, row-wise Adagrad on unique rows)
next to the plain-PyTorch DLRM step on the same synthetic batches, in one process.

The baseline is what a careful PyTorch user writes without FBGEMM: every table in ONE
``nn.EmbeddingBag(sparse=True)`` with per-table row offsets, ``torch.optim.SparseAdam`` for
it, ``Adagrad`` for the MLPs, the dot interaction as one flat ``index_select`` of the upper
triangle, TF32 on CUDA. headrace runs ``trainer.model.DLRM`` over a
``trainer.fused_embedding.FusedEmbeddingBagCollection`` with ``Adagrad`` on the MLPs. Both see
the same batches (26 single-valued Criteo-Kaggle features with the Kaggle cardinalities
capped at ``--rows-cap``, 13 dense), are timed in short alternating blocks, and the median
block of each is reported; the ratio is headrace / baseline samples/s (``paired_ratio``: the
median ratio of adjacent blocks, steadier when other processes load the machine). The
default CPU shape (batch 2048, bottom 13-64-16, top 64-32-1) runs in about 15 s at 100k
rows per table; CUDA defaults to batch 16384, bottom 512-256-16, top 512-256-1.

    python bench/gpu_train.py [--device cpu|cuda] [--rows-cap 100000] [--embedding-dtype fp32]
                              [--batch-size N] [--steps N] [--blocks 8] [--json] [--profile]

With ``--json`` the last stdout line is ``{"device", "baseline_samples_per_s",
"samples_per_s", "ratio", "data_wait_fraction", "row_cache_samples_per_s",
"row_cache_ratio", ...}``; the last three are null until the loop (LMDB cache) and the row
cache are measured here. Swap ``headrace_samples_per_s`` for a call into the real trainer to
include data loading.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from trainer.batch import Jagged  # noqa: E402
from trainer.embedding import TableSpec  # noqa: E402
from trainer.fused_embedding import FusedEmbeddingBagCollection  # noqa: E402
from trainer.model import DLRM, build_mlp  # noqa: E402
from trainer.sparse_optim import SparseOptimizerKind  # noqa: E402

__all__ = ["BenchShape", "SyntheticBatch", "make_batches", "baseline_samples_per_s",
           "headrace_samples_per_s", "main"]

#: Rows of the 26 categorical features of Criteo Kaggle (DLRM's day_fea_count).
CRITEO_KAGGLE_ROWS = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                      8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                      286181, 105, 142572)
NUM_DENSE = 13


@dataclasses.dataclass(frozen=True)
class BenchShape:
    batch_size: int
    dim: int
    rows: tuple[int, ...]
    bottom_hidden: tuple[int, ...]  # the bottom MLP ends in `dim` after these
    top_hidden: tuple[int, ...]  # a 1-unit logit layer follows these

    @property
    def bottom_mlp(self) -> tuple[int, ...]:
        return self.bottom_hidden + (self.dim,)


@dataclasses.dataclass
class SyntheticBatch:
    """One step's input in both layouts: ``sparse`` for headrace (table-local rows, as the
    loader yields them) and ``values``/``offsets`` pre-shifted for the one baseline bag (as a
    plain-PyTorch loader would prepare them)."""

    dense: torch.Tensor
    labels: torch.Tensor
    sparse: dict[str, Jagged]
    values: torch.Tensor
    offsets: torch.Tensor


def make_batches(shape: BenchShape, count: int, device: torch.device, *, seed: int = 0,
                 id_skew: float = 1.0) -> list[SyntheticBatch]:
    """``count`` batches of single-valued features; ids ``floor(rows * u**id_skew)`` (1.0 =
    uniform; larger = a few hot rows, fewer unique rows per batch)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.tensor((0,) + shape.rows[:-1]).cumsum(0)
    out = []
    b = shape.batch_size
    for _ in range(count):
        u = torch.rand(len(shape.rows), b, generator=gen, dtype=torch.float64) ** id_skew
        ids = (u * torch.tensor(shape.rows, dtype=torch.float64)[:, None]).long()
        ids = torch.minimum(ids, torch.tensor(shape.rows)[:, None] - 1)
        dense = torch.log1p(torch.rand(b, NUM_DENSE, generator=gen) * 100)
        labels = (torch.rand(b, generator=gen) < 0.25).float()
        one = torch.arange(b + 1)
        sparse = {f"c{i}": Jagged(ids[i].to(device), one.to(device)) for i in range(len(shape.rows))}
        out.append(SyntheticBatch(dense.to(device), labels.to(device), sparse,
                                  (ids + starts[:, None]).reshape(-1).to(device),
                                  torch.arange(ids.numel()).to(device)))
    return out


class PlainDLRM(nn.Module):
    """The baseline DLRM: one sparse ``nn.EmbeddingBag`` over all tables (row offsets per
    table), interaction as one flat ``index_select`` of the strict upper triangle."""

    def __init__(self, shape: BenchShape, device: torch.device):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        f = len(shape.rows)
        self.num_features, self.dim = f, shape.dim
        self.bottom = build_mlp(NUM_DENSE, shape.bottom_mlp, g, final_activation=True)
        self.table = nn.EmbeddingBag(sum(shape.rows), shape.dim, mode="sum", sparse=True)
        with torch.no_grad():
            self.table.weight.uniform_(-0.01, 0.01)
        iu = torch.triu_indices(f + 1, f + 1, offset=1)
        self.register_buffer("flat_triu", iu[0] * (f + 1) + iu[1])
        self.top = build_mlp(shape.dim + iu.shape[1], shape.top_hidden + (1,), g,
                             final_activation=False)
        self.to(device)

    def forward(self, dense, values, offsets):
        d = self.bottom(dense)
        e = self.table(values, offsets).view(self.num_features, -1, self.dim).transpose(0, 1)
        t = torch.cat([d.unsqueeze(1), e], dim=1)
        z = torch.bmm(t, t.transpose(1, 2)).flatten(1)
        return self.top(torch.cat([d, z.index_select(1, self.flat_triu)], dim=1)).squeeze(1)


def _timed(step: Callable[[SyntheticBatch], None], batches, steps: int, device: torch.device,
           first: int = 0) -> float:
    """Samples/s of ``steps`` calls of ``step`` on ``batches[first:]`` (cycled)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(first, first + steps):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batches[0].labels.numel() / (time.perf_counter() - t0)


def baseline_step(shape: BenchShape, device: torch.device, lr: float = 0.01):
    """The plain-PyTorch training step as a closure over its model and optimizers."""
    model = PlainDLRM(shape, device)
    dense_opt = torch.optim.Adagrad([p for n, p in model.named_parameters() if not n.startswith("table.")], lr=lr)
    sparse_opt = torch.optim.SparseAdam(model.table.parameters(), lr=lr / 10)

    def step(batch: SyntheticBatch) -> None:
        dense_opt.zero_grad(set_to_none=True)
        sparse_opt.zero_grad(set_to_none=True)
        logits = model(batch.dense, batch.values, batch.offsets)
        F.binary_cross_entropy_with_logits(logits, batch.labels).backward()
        # autograd built the sparse gradient itself: torch's invariant checks only cost time
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            dense_opt.step()
            sparse_opt.step()
    return step


def headrace_step(shape: BenchShape, device: torch.device, lr: float = 0.01, *,
                  embedding_dtype: torch.dtype = torch.float32):
    """headrace's training step (the order of ``trainer.loop``) as a closure."""
    tables = [TableSpec(f"c{i}", r, shape.dim) for i, r in enumerate(shape.rows)]
    ebc = FusedEmbeddingBagCollection(tables, seed=0, optimizer=SparseOptimizerKind.ROWWISE_ADAGRAD,
                                      learning_rate=lr, embedding_dtype=embedding_dtype, device=device)
    model = DLRM(NUM_DENSE, ebc, embedding_dim=shape.dim, bottom_mlp=shape.bottom_mlp,
                 top_mlp=shape.top_hidden, seed=0).to(device)
    opt = torch.optim.Adagrad(model.parameters(), lr=lr)  # the fused tables are not parameters

    def step(batch: SyntheticBatch) -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(batch.dense, batch.sparse)
        F.binary_cross_entropy_with_logits(logits, batch.labels).backward()
        opt.step()
        ebc.sparse_step()
    return step


def baseline_samples_per_s(step, batches, *, steps: int, device: torch.device, block: int = 0) -> float:
    """Samples/s of the baseline over one block of ``steps`` steps (see ``main``)."""
    return _timed(step, batches, steps, device, first=block * steps)


def headrace_samples_per_s(step, batches, *, steps: int, device: torch.device, block: int = 0) -> float:
    """headrace's samples/s over one block of ``steps`` steps; the place to call the real
    trainer (LMDB cache -> loop) instead, once it trains the fused collection."""
    return _timed(step, batches, steps, device, first=block * steps)


def _profile(name: str, step, batches, device: torch.device, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile: {name} ({steps} steps) ---", file=sys.stderr)
    print(prof.key_averages().table(sort_by=key, row_limit=18), file=sys.stderr)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--batch-size", type=int, default=0, help="default 2048 on CPU, 16384 on CUDA")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--rows-cap", type=int, default=100_000, help="cap on each table's rows")
    ap.add_argument("--tables", type=int, default=26, help="the first N Criteo-Kaggle tables")
    ap.add_argument("--bottom-hidden", type=_ints, default=None,
                    help="bottom MLP sizes before the final `dim` (default 64 CPU, 512,256 CUDA)")
    ap.add_argument("--top-hidden", type=_ints, default=None,
                    help="top MLP sizes before the logit (default 64,32 CPU, 512,256 CUDA)")
    ap.add_argument("--steps", type=int, default=0,
                    help="timed steps of each, split into --blocks (default 40 CPU, 400 CUDA)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps of each before timing")
    ap.add_argument("--blocks", type=int, default=8,
                    help="alternating timed blocks of each; the median block is reported")
    ap.add_argument("--id-skew", type=float, default=1.0, help="ids = rows * u**skew (1 = uniform)")
    ap.add_argument("--embedding-dtype", choices=sorted(_DTYPES), default="fp32",
                    help="headrace's table dtype (16-bit: stochastic rounding)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables on stderr")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for name in ("batch_size", "steps", "warmup", "threads"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.dim < 1 or args.rows_cap < 1 or args.blocks < 1:
        ap.error("--dim, --rows-cap and --blocks must be >= 1")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not 1 <= args.tables <= len(CRITEO_KAGGLE_ROWS):
        ap.error(f"--tables must be in 1..{len(CRITEO_KAGGLE_ROWS)}")
    shape = BenchShape(
        batch_size=args.batch_size or (16384 if cuda else 2048), dim=args.dim,
        rows=tuple(min(r, args.rows_cap) for r in CRITEO_KAGGLE_ROWS[:args.tables]),
        bottom_hidden=args.bottom_hidden if args.bottom_hidden is not None else ((512, 256) if cuda else (64,)),
        top_hidden=args.top_hidden if args.top_hidden is not None else ((512, 256) if cuda else (64, 32)))
    steps = max(1, (args.steps or (400 if cuda else 40)) // args.blocks)  # per block

    t0 = time.perf_counter()
    batches = make_batches(shape, 8, device, id_skew=args.id_skew)
    runners = {"baseline": (baseline_samples_per_s, baseline_step(shape, device)),
               "headrace": (headrace_samples_per_s,
                            headrace_step(shape, device, embedding_dtype=_DTYPES[args.embedding_dtype]))}
    setup_s = time.perf_counter() - t0
    # Short blocks alternating between the two, medians per side: a burst of load from
    # other processes on a shared machine spoils a block or two, not the ratio.
    for _, step in runners.values():
        _timed(step, batches, args.warmup, device)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for block in range(args.blocks):
        for name, (measure, step) in runners.items():
            rates[name].append(measure(step, batches, steps=steps, device=device, block=block))
    if args.profile:
        for name, (_, step) in runners.items():
            _profile(name, step, batches, device)
    base, mine = statistics.median(rates["baseline"]), statistics.median(rates["headrace"])
    unique = sum(int(torch.unique(b.values).numel()) for b in batches) / len(batches)

    print(f"device {device} ({torch.get_num_threads()} threads), batch {shape.batch_size}, "
          f"{len(shape.rows)} tables, {sum(shape.rows):,} rows x D{shape.dim}, "
          f"{unique:,.0f} unique rows/batch, headrace tables {args.embedding_dtype}, "
          f"setup {setup_s:.1f} s", file=sys.stderr)
    print(f"{'':10s} {'samples/s':>12s}   blocks of {steps} steps", file=sys.stderr)
    for name, value in (("baseline", base), ("headrace", mine)):
        print(f"{name:10s} {value:12,.0f}   " + " ".join(f"{r:,.0f}" for r in rates[name]), file=sys.stderr)
    # Adjacent blocks share the machine's load at the time: their ratios are paired samples.
    paired = statistics.median(h / b for h, b in zip(rates["headrace"], rates["baseline"]))
    print(f"{'ratio':10s} {mine / base:12.2f}   (median of block-pair ratios {paired:.2f})",
          file=sys.stderr)
    if args.json:
        print(orjson.dumps({
            "device": str(device), "baseline_samples_per_s": base, "samples_per_s": mine,
            "ratio": mine / base, "paired_ratio": paired, "data_wait_fraction": None, "row_cache_samples_per_s": None,
            "row_cache_ratio": None, "batch_size": shape.batch_size, "dim": shape.dim,
            "rows_cap": args.rows_cap, "tables": len(shape.rows), "total_rows": sum(shape.rows),
            "threads": torch.get_num_threads(), "embedding_dtype": args.embedding_dtype,
            "steps_per_block": steps, "blocks": rates,
        }).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
