"""Trainer throughput on the DLRM of issue 9, three ways in ONE process: the plain-PyTorch
fused baseline, headrace's ``ContinuousTrainer`` reading an LMDB batch cache, and the same
trainer over the SSD row cache.

(a) ``baseline``: what a careful PyTorch user writes without FBGEMM: every table in ONE
    ``nn.EmbeddingBag(sparse=True)`` with per-table row offsets, ``torch.optim.SparseAdam``
    for it, ``Adagrad`` for the MLPs, the dot interaction as one flat ``index_select`` of the
    upper triangle, TF32 on CUDA, fed pre-shifted in-memory batches (no loader).
    It is timed in short blocks alternating with ``step``: headrace's DLRM over a
    ``FusedEmbeddingBagCollection`` (row-wise Adagrad on unique rows, ``Adagrad`` on the
    MLPs) stepped on the same in-memory batches, the loop's step without the loop. The
    median block of each is reported; ``step_ratio`` = step / baseline, ``step_paired_ratio``
    the median ratio of adjacent blocks (steadier when other processes load the machine).
(b) ``samples_per_s``: ``trainer.loop.ContinuousTrainer`` built from a ``TrainSpec`` of the
    same shape, reading a real ``storage.batch_cache.BatchCache`` written to a temporary
    directory first (see Data): loader thread, Arrow -> tensors, host -> device copies,
    progressive metrics and all. Run as ``--segments`` consecutive trainers, each
    resuming the previous one's checkpoint, between the blocks of (a), so that load from other
    processes hits both alike. Each segment's first ``--warmup`` batches (the progress
    callback fires there) and its final checkpoint (``final_checkpoint_s``) are untimed;
    ``data_wait_fraction`` is the share of the timed seconds the loop waited for the loader.
    ``ratio`` = (b) / (a); ``paired_ratio`` the median of each segment over the baseline block
    just before it.
(c) ``row_cache_samples_per_s``: (b) with ``[row_cache] enabled`` (fsync on, prefetch on, LRU),
    ``cache_rows`` = the largest table's rows / ``--cache-ratio`` (8: the largest tables hold
    8x their cache), over the first batches of the same cache (``--row-cache-batches`` timed,
    in ``--row-cache-segments``); ``row_cache_ratio`` = (c) / (b).

Data: 26 single-valued features, ids ``floor(rows * u**id_skew)`` (uniform by default) over
the Criteo-Kaggle cardinalities capped at ``--rows-cap``, 13 dense features, 25% positives.
(a) cycles 8 in-memory batches; (b) and (c) read a stream of fresh batches of the same
distribution (nothing repeats, so the row cache's hit rate is the distribution's).

CPU (the default; about a minute on two cores): batch 2048, bottom 13-64-16, top 64-32-1,
tables capped at 100k rows::

    python bench/gpu_train.py --json                     # add --rows-cap 2000000 for big tables

CUDA defaults are the issue's Criteo-Kaggle shape (26 tables capped at 10M rows = 33.8M rows,
13 dense, D=16, bottom 512-256-D, top 1024-1024-512-256-1, batch 65536, TF32)::

    python bench/gpu_train.py --device cuda --json [--dim 64|128] [--precision bf16]
        [--embedding-dtype bf16] [--no-row-cache] [--profile] [--interaction dot_concat]

headrace's DLRM reads the dots alone, as the baseline does, unless ``--interaction
dot_concat`` (``[model]``'s default) adds the pooled embeddings to its top MLP's input: then
``step_ratio`` / ``ratio`` measure what that costs against the same baseline.

With ``--json`` the last stdout line is ``{"device", "baseline_samples_per_s",
"samples_per_s", "ratio", "data_wait_fraction", "row_cache_samples_per_s",
"row_cache_ratio", "paired_ratio", "step_samples_per_s", "step_ratio", "trainer": {...},
"row_cache": {...}, ...shape}`` (the row-cache keys are null with ``--no-row-cache``).
Progress and a table of every block and segment go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from storage.batch_cache import BatchCache  # noqa: E402
from storage.config import CacheConfig, CacheDurability  # noqa: E402
from trainer.batch import Jagged  # noqa: E402
from trainer.config import (  # noqa: E402
    EmbeddingDtype, Interaction, ModelConfig, Precision, RowCacheConfig, SparseOptimizerKind, TrainerConfig,
    TrainSpec,
)
from trainer.embedding import TableSpec  # noqa: E402
from trainer.fused_embedding import FusedEmbeddingBagCollection  # noqa: E402
from trainer.loop import ContinuousTrainer  # noqa: E402
from trainer.model import DLRM, EMBEDDING_TORCH_DTYPES, build_mlp  # noqa: E402
from transforms.config import DenseFeature, SchemaConfig, SparseFeature  # noqa: E402
from transforms.elements import ProcessedBatch  # noqa: E402

__all__ = ["BenchShape", "SyntheticBatch", "make_batches", "baseline_step", "headrace_step",
           "write_cache", "train_spec", "trainer_samples_per_s", "main"]

#: Rows of the 26 categorical features of Criteo Kaggle (DLRM's day_fea_count).
CRITEO_KAGGLE_ROWS = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                      8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                      286181, 105, 142572)
NUM_DENSE = 13
LEARNING_RATE = 0.01


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

    def to(self, device: torch.device) -> SyntheticBatch:
        return SyntheticBatch(self.dense.to(device), self.labels.to(device),
                              {k: v.to(device) for k, v in self.sparse.items()},
                              self.values.to(device), self.offsets.to(device))


def synthetic_rows(shape: BenchShape, n: int, rng: np.random.Generator, id_skew: float = 1.0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` samples: ids [F, n] int64 ``floor(rows * u**id_skew)`` per table (1.0 = uniform;
    larger = a few hot rows, fewer unique rows per batch), dense [NUM_DENSE, n] float32
    ``log1p(100 u)``, labels [n] float32 with 25% positives."""
    rows = np.asarray(shape.rows, dtype=np.int64)[:, None]
    u = rng.random((len(shape.rows), n))
    if id_skew != 1.0:
        u **= id_skew
    ids = np.minimum((u * rows).astype(np.int64), rows - 1)
    dense = np.log1p(rng.random((NUM_DENSE, n), dtype=np.float32) * 100)
    labels = (rng.random(n) < 0.25).astype(np.float32)
    return ids, dense, labels


def make_batches(shape: BenchShape, count: int, *, seed: int = 0,
                 id_skew: float = 1.0) -> list[SyntheticBatch]:
    """``count`` CPU batches of single-valued features (``synthetic_rows``)."""
    rng = np.random.default_rng(seed)
    starts = torch.tensor((0,) + shape.rows[:-1]).cumsum(0)
    out = []
    b = shape.batch_size
    for _ in range(count):
        ids, dense, labels = (torch.from_numpy(a) for a in synthetic_rows(shape, b, rng, id_skew))
        one = torch.arange(b + 1)
        sparse = {f"c{i}": Jagged(ids[i], one) for i in range(len(shape.rows))}
        out.append(SyntheticBatch(dense.T.contiguous(), labels, sparse,
                                  (ids + starts[:, None]).reshape(-1), torch.arange(ids.numel())))
    return out


# -- (a) the baseline and headrace's step alone -------------------------------------------


class PlainDLRM(nn.Module):
    """The baseline DLRM: one sparse ``nn.EmbeddingBag`` over all tables (row offsets per
    table), interaction as one flat ``index_select`` of the strict upper triangle."""

    def __init__(self, shape: BenchShape, device: torch.device):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        f = len(shape.rows)
        self.num_features, self.dim = f, shape.dim
        self.bottom = build_mlp(NUM_DENSE, shape.bottom_mlp, g, final_activation=True)
        self.table = nn.EmbeddingBag(sum(shape.rows), shape.dim, mode="sum", sparse=True,
                                     device=device)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[SyntheticBatch], None], batches, steps: int, device: torch.device,
           first: int = 0) -> float:
    """Samples/s of ``steps`` calls of ``step`` on ``batches[first:]`` (cycled)."""
    _sync(device)
    t0 = time.perf_counter()
    for i in range(first, first + steps):
        step(batches[i % len(batches)])
    _sync(device)
    return steps * batches[0].labels.numel() / (time.perf_counter() - t0)


def _set_tf32(device: torch.device, on: bool) -> None:
    # Process-wide; the trainer's precision setting changes it too, so each step sets its own.
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def baseline_step(shape: BenchShape, device: torch.device, lr: float = LEARNING_RATE):
    """The plain-PyTorch training step (TF32 on CUDA) as a closure over its model and optimizers."""
    model = PlainDLRM(shape, device)
    dense_opt = torch.optim.Adagrad([p for n, p in model.named_parameters() if not n.startswith("table.")], lr=lr)
    sparse_opt = torch.optim.SparseAdam(model.table.parameters(), lr=lr / 10)

    def step(batch: SyntheticBatch) -> None:
        _set_tf32(device, True)
        dense_opt.zero_grad(set_to_none=True)
        sparse_opt.zero_grad(set_to_none=True)
        logits = model(batch.dense, batch.values, batch.offsets)
        F.binary_cross_entropy_with_logits(logits, batch.labels).backward()
        # autograd built the sparse gradient itself: torch's invariant checks only cost time
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            dense_opt.step()
            sparse_opt.step()
    return step


def headrace_step(shape: BenchShape, device: torch.device, lr: float = LEARNING_RATE, *,
                  embedding_dtype: torch.dtype = torch.float32,
                  precision: Precision = Precision.TF32, interaction: Interaction = Interaction.DOT):
    """headrace's model and training step (the order of ``trainer.loop``) as a closure."""
    tables = [TableSpec(f"c{i}", r, shape.dim) for i, r in enumerate(shape.rows)]
    ebc = FusedEmbeddingBagCollection(tables, seed=0, optimizer=SparseOptimizerKind.ROWWISE_ADAGRAD,
                                      learning_rate=lr, embedding_dtype=embedding_dtype, device=device)
    model = DLRM(NUM_DENSE, ebc, embedding_dim=shape.dim, bottom_mlp=shape.bottom_mlp,
                 top_mlp=shape.top_hidden, seed=0, interaction=interaction).to(device)
    opt = torch.optim.Adagrad(model.parameters(), lr=lr)  # the fused tables are not parameters
    bf16 = precision is Precision.BF16

    def step(batch: SyntheticBatch) -> None:
        _set_tf32(device, precision is Precision.TF32)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch.dense, batch.sparse).float()
        F.binary_cross_entropy_with_logits(logits, batch.labels).backward()
        opt.step()
        ebc.sparse_step()
    return step


# -- (b), (c) the trainer from an LMDB cache ----------------------------------------------


def write_cache(cache_cfg: CacheConfig, shape: BenchShape, total_rows: int, cache_batch_rows: int,
                *, seed: int = 1, id_skew: float = 1.0) -> int:
    """Write ``total_rows`` fresh ``synthetic_rows`` (no sample repeats: a stream, so the row
    cache sees the hit rate of the id distribution, not of a short cycle) as cached batches
    of ``cache_batch_rows`` rows, shaped like the pipeline's output; returns the bytes stored."""
    rng = np.random.default_rng(seed)
    with BatchCache.from_config(cache_cfg) as cache:
        for start in range(0, total_rows, cache_batch_rows):
            n = min(cache_batch_rows, total_rows - start)
            ids, dense, labels = synthetic_rows(shape, n, rng, id_skew)
            cols = {"label": pa.array(labels)}
            cols.update((f"d{j}", pa.array(dense[j])) for j in range(NUM_DENSE))
            cols.update((f"c{i}", pa.array(ids[i])) for i in range(len(shape.rows)))
            at = np.arange(start, start + n, dtype=np.int64)
            cols["_offset"] = pa.array(at)
            cols["_event_time_ms"] = pa.array(at * 10)
            cache.write(ProcessedBatch("bench", 0, start, start + n, 0, pa.record_batch(cols), (),
                                       np.empty(0, np.int64), read=n))
        return int(cache.stat()["bytes"])


def train_spec(shape: BenchShape, cache_cfg: CacheConfig, checkpoint_dir: str, device: torch.device, *,
               precision: Precision, embedding_dtype: EmbeddingDtype,
               row_cache: RowCacheConfig | None = None, interaction: Interaction = Interaction.DOT) -> TrainSpec:
    """The trainer's config for ``shape``: features ``d0..d12`` and ``c0..c25``, row-wise
    Adagrad on the tables and Adagrad on the MLPs at ``LEARNING_RATE`` (the baseline's dense
    rate), no periodic checkpoints, a metrics window of one batch (its AUC is cheap)."""
    schema = SchemaConfig(dense=tuple(DenseFeature(f"d{j}") for j in range(NUM_DENSE)),
                          sparse=tuple(SparseFeature(f"c{i}", rows=r) for i, r in enumerate(shape.rows)))
    trainer = TrainerConfig(
        embedding_dim=shape.dim, bottom_mlp=shape.bottom_mlp, top_mlp=shape.top_hidden,
        batch_size=shape.batch_size, learning_rate=LEARNING_RATE, precision=precision,
        embedding_dtype=embedding_dtype, checkpoint_dir=checkpoint_dir,
        checkpoint_every_batches=10**9, metrics_window=shape.batch_size, device=str(device),
        batch_ramp_samples=0)  # the baseline trains whole batches from the first step
    # The baseline's model: no first-order part, no dense normaliser and by default the dots
    # alone in the top MLP ([model] defaults add the first-order part, the normaliser and the
    # pooled embeddings; --interaction dot_concat measures what the last one costs).
    return TrainSpec(schema=schema, trainer=trainer, row_cache=row_cache or RowCacheConfig(), cache=cache_cfg,
                     model=ModelConfig(wide=False, normalize_dense=False, interaction=interaction))


def trainer_samples_per_s(cfg: TrainSpec, device: torch.device, *, warmup: int,
                          max_batches: int | None = None) -> dict[str, Any]:
    """Run ``ContinuousTrainer`` over the cache of ``cfg`` (resuming from the newest checkpoint
    in its ``checkpoint_dir``); rates after the first ``warmup`` batches of this run (the
    progress callback marks that point), the final checkpoint excluded."""
    marks: list[tuple[dict, Any]] = []
    trainer: ContinuousTrainer | None = None

    def on_progress(progress: dict) -> None:
        if not marks:
            stats = getattr(trainer.model.embeddings, "stats", None)
            marks.append((progress, None if stats is None else dataclasses.replace(stats)))

    trainer = ContinuousTrainer(cfg, device=device, on_progress=on_progress,
                                progress_every_batches=warmup, max_batches=max_batches,
                                keep_checkpoints=1)
    try:
        summary = trainer.run()
    finally:
        close = getattr(trainer.model.embeddings, "close", None)
        if close is not None:
            close()
    if not marks or summary["trained_batches"] <= warmup:
        raise SystemExit(f"the trainer ran {summary['trained_batches']} batches, not more than "
                         f"--warmup {warmup}: the cache is too short")
    w, base = marks[0]
    seconds = summary["elapsed_s"] - w["elapsed_s"]
    out = {
        "samples": summary["trained_samples"] - w["trained_samples"],
        "seconds": seconds,
        "data_wait_s": summary["data_wait_s"] - w["data_wait_s"],
        "warmup_s": w["elapsed_s"],
        "final_checkpoint_s": summary["final_checkpoint_s"],
        "auc": summary["auc"],
    }
    stats = getattr(trainer.model.embeddings, "stats", None)
    if stats is not None:
        out.update(lookups=stats.lookups - base.lookups, hits=stats.hits - base.hits,
                   store_wait_s=stats.store_wait_s - base.store_wait_s)
    return out


class TrainerSegments:
    """One trainer configuration run as consecutive ``ContinuousTrainer`` segments over the
    cache, each resuming from the previous one's checkpoint, so its timed batches can
    alternate with other measurements; every segment's first ``warmup`` batches are untimed."""

    def __init__(self, cfg: TrainSpec, device: torch.device, *, warmup: int, timed_batches: int):
        self.cfg, self.device, self.warmup, self.timed_batches = cfg, device, warmup, timed_batches
        self.segments: list[dict[str, Any]] = []

    def run_segment(self) -> float:
        """Samples/s of the next segment's timed batches."""
        r = trainer_samples_per_s(self.cfg, self.device, warmup=self.warmup,
                                  max_batches=self.warmup + self.timed_batches)
        r["samples_per_s"] = r["samples"] / r["seconds"]
        self.segments.append(r)
        return r["samples_per_s"]

    @property
    def rates(self) -> list[float]:
        return [s["samples_per_s"] for s in self.segments]

    def summary(self) -> dict[str, Any]:
        """Totals over the segments' timed batches."""
        seconds = sum(s["seconds"] for s in self.segments)
        out = {
            "samples_per_s": sum(s["samples"] for s in self.segments) / seconds,
            "data_wait_fraction": sum(s["data_wait_s"] for s in self.segments) / seconds,
            "segments": len(self.segments),
            "timed_batches": self.timed_batches * len(self.segments),
            "warmup_batches_per_segment": self.warmup,
            "seconds": seconds,
            "warmup_s": sum(s["warmup_s"] for s in self.segments),
            "final_checkpoint_s": sum(s["final_checkpoint_s"] for s in self.segments),
            "auc": self.segments[-1]["auc"],
            "segment_samples_per_s": self.rates,
        }
        if "lookups" in self.segments[0]:
            out["hit_rate"] = sum(s["hits"] for s in self.segments) / max(1, sum(s["lookups"] for s in self.segments))
            out["store_wait_ms_per_batch"] = 1e3 * sum(s["store_wait_s"] for s in self.segments) / out["timed_batches"]
        return out


# -- driver ---------------------------------------------------------------------------------


def _profile(name: str, step, batches, device: torch.device, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile: {name} ({steps} steps) ---", file=sys.stderr)
    print(prof.key_averages().table(sort_by=key, row_limit=18), file=sys.stderr)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--batch-size", type=int, default=0, help="default 2048 on CPU, 65536 on CUDA")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--rows-cap", type=int, default=0,
                    help="cap on each table's rows (default 100000 on CPU, 10000000 on CUDA)")
    ap.add_argument("--tables", type=int, default=26, help="the first N Criteo-Kaggle tables")
    ap.add_argument("--bottom-hidden", type=_ints, default=None,
                    help="bottom MLP sizes before the final `dim` (default 64 CPU, 512,256 CUDA)")
    ap.add_argument("--top-hidden", type=_ints, default=None,
                    help="top MLP sizes before the logit (default 64,32 CPU, 1024,1024,512,256 CUDA)")
    ap.add_argument("--steps", type=int, default=0,
                    help="timed baseline/step steps of each, split into --blocks (default 80 CPU, 200 CUDA)")
    ap.add_argument("--warmup", type=int, default=10,
                    help="untimed steps of each, and untimed trainer batches, before timing")
    ap.add_argument("--blocks", type=int, default=8,
                    help="alternating timed blocks of baseline and step; the median block is reported")
    ap.add_argument("--train-batches", type=int, default=0,
                    help="timed trainer batches in all (default 240 CPU, 100 CUDA)")
    ap.add_argument("--segments", type=int, default=0,
                    help="trainer runs the timed batches are split into, each resuming the previous "
                         "one and alternating with the blocks (default 4 CPU, 1 CUDA)")
    ap.add_argument("--row-cache-batches", type=int, default=0,
                    help="timed row-cached trainer batches in all (default 60 CPU, 30 CUDA)")
    ap.add_argument("--row-cache-segments", type=int, default=0, help="default 2 CPU, 1 CUDA")
    ap.add_argument("--cache-ratio", type=float, default=8.0, help="largest table rows / cache rows")
    ap.add_argument("--no-row-cache", action="store_true", help="skip (c)")
    ap.add_argument("--cache-batch-rows", type=int, default=8192, help="rows per cached (LMDB) batch")
    ap.add_argument("--id-skew", type=float, default=1.0, help="ids = rows * u**skew (1 = uniform)")
    ap.add_argument("--embedding-dtype", choices=[d.value for d in EmbeddingDtype], default="fp32",
                    help="headrace's table dtype (16-bit: stochastic rounding)")
    ap.add_argument("--precision", choices=[p.value for p in Precision], default="tf32",
                    help="headrace's MLP arithmetic (the baseline always runs TF32 on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    ap.add_argument("--dir", default="", help="parent of the temporary cache/checkpoint/row-store dir")
    ap.add_argument("--interaction", choices=[i.value for i in Interaction], default="dot",
                    help="headrace's DLRM top MLP input (the baseline's is dot); dot_concat is [model]'s default")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of (a) on stderr")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for name in ("batch_size", "steps", "warmup", "threads", "train_batches", "row_cache_batches",
                 "rows_cap", "segments", "row_cache_segments"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.dim < 1 or args.blocks < 1 or args.warmup < 1 or args.cache_batch_rows < 1:
        ap.error("--dim, --blocks, --warmup and --cache-batch-rows must be >= 1")
    if not args.cache_ratio >= 1:
        ap.error(f"--cache-ratio must be >= 1, got {args.cache_ratio}")
    if not 1 <= args.tables <= len(CRITEO_KAGGLE_ROWS):
        ap.error(f"--tables must be in 1..{len(CRITEO_KAGGLE_ROWS)}")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    return args


def _schedule(segments: int, blocks: int) -> list[int]:
    """The blocks after which each of ``segments`` trainer runs happens, spread evenly."""
    return [i * blocks // segments for i in range(segments)]


def main(argv=None) -> int:
    args = _parse(argv)
    device = args.device
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = BenchShape(
        batch_size=args.batch_size or (65536 if cuda else 2048), dim=args.dim,
        rows=tuple(min(r, args.rows_cap or (10_000_000 if cuda else 100_000))
                   for r in CRITEO_KAGGLE_ROWS[:args.tables]),
        bottom_hidden=args.bottom_hidden if args.bottom_hidden is not None else ((512, 256) if cuda else (64,)),
        top_hidden=args.top_hidden if args.top_hidden is not None else
        ((1024, 1024, 512, 256) if cuda else (64, 32)))
    steps = max(1, (args.steps or (200 if cuda else 80)) // args.blocks)  # per block
    segments = min(args.blocks, args.segments or (1 if cuda else 4))
    per_segment = max(1, (args.train_batches or (100 if cuda else 240)) // segments)
    rc_segments = 0 if args.no_row_cache else min(args.blocks, args.row_cache_segments or (1 if cuda else 2))
    rc_per_segment = max(1, (args.row_cache_batches or (30 if cuda else 60)) // max(1, rc_segments))
    cache_rows = math.ceil(max(shape.rows) / args.cache_ratio)
    precision, emb_dtype = Precision(args.precision), EmbeddingDtype(args.embedding_dtype)
    interaction = Interaction(args.interaction)

    t0 = time.perf_counter()
    host_batches = make_batches(shape, 8, id_skew=args.id_skew)
    unique = sum(int(torch.unique(b.values).numel()) for b in host_batches) / len(host_batches)
    parent = tempfile.mkdtemp(prefix="headrace-gpu-train-", dir=args.dir or None)
    try:
        # The trainers' data: fresh batches of the same distribution.
        cache_cfg = CacheConfig(path=os.path.join(parent, "cache"), durability=CacheDurability.NO_METASYNC)
        total_batches = max(segments * (args.warmup + per_segment), rc_segments * (args.warmup + rc_per_segment))
        cache_bytes = write_cache(cache_cfg, shape, total_batches * shape.batch_size,
                                  args.cache_batch_rows, id_skew=args.id_skew)
        batches = [b.to(device) for b in host_batches]
        del host_batches
        runners = {"baseline": baseline_step(shape, device),
                   "step": headrace_step(shape, device, embedding_dtype=EMBEDDING_TORCH_DTYPES[emb_dtype],
                                         precision=precision, interaction=interaction)}
        trainer = TrainerSegments(
            train_spec(shape, cache_cfg, os.path.join(parent, "ck-plain"), device,
                       precision=precision, embedding_dtype=emb_dtype, interaction=interaction),
            device, warmup=args.warmup, timed_batches=per_segment)
        rc_cfg = RowCacheConfig(enabled=True, path=os.path.join(parent, "rows"), cache_rows=cache_rows)
        row_cached = TrainerSegments(
            train_spec(shape, cache_cfg, os.path.join(parent, "ck-rows"), device, precision=precision,
                       embedding_dtype=emb_dtype, row_cache=rc_cfg, interaction=interaction),
            device, warmup=args.warmup, timed_batches=rc_per_segment)
        print(f"setup {time.perf_counter() - t0:.1f} s (cache {cache_bytes / 2**20:,.0f} MiB)", file=sys.stderr)

        # Short blocks alternating between the baseline and the step, with the trainer
        # segments in between; medians per side: a burst of load from other processes on a
        # shared machine spoils a block or two, not the ratio.
        for step in runners.values():
            _timed(step, batches, args.warmup, device)
        rates: dict[str, list[float]] = {name: [] for name in runners}
        pairs: dict[str, list[float]] = {"trainer": [], "row_cache": []}
        plain_at, cached_at = _schedule(segments, args.blocks), _schedule(rc_segments, args.blocks)
        for block in range(args.blocks):
            for name, step in runners.items():
                rates[name].append(_timed(step, batches, steps, device, first=block * steps))
            for _ in range(plain_at.count(block)):
                pairs["trainer"].append(trainer.run_segment() / rates["baseline"][-1])
                _free(device)
            for _ in range(cached_at.count(block)):
                pairs["row_cache"].append(row_cached.run_segment() / trainer.rates[-1])
                _free(device)
        if args.profile:
            for name, step in runners.items():
                _profile(name, step, batches, device)
    finally:
        shutil.rmtree(parent, ignore_errors=True)

    base, step_rate = statistics.median(rates["baseline"]), statistics.median(rates["step"])
    # Adjacent blocks share the machine's load at the time: their ratios are paired samples.
    step_paired = statistics.median(h / b for h, b in zip(rates["step"], rates["baseline"]))
    plain = trainer.summary()
    cached = row_cached.summary() if rc_segments else None
    mine = plain["samples_per_s"]
    print(f"device {device} ({torch.get_num_threads()} threads), batch {shape.batch_size}, "
          f"{len(shape.rows)} tables, {sum(shape.rows):,} rows x D{shape.dim}, "
          f"{unique:,.0f} unique rows/batch, tables {args.embedding_dtype}, precision {args.precision}",
          file=sys.stderr)
    print(f"{'':10s} {'samples/s':>12s}   blocks of {steps} steps / segments of {per_segment} batches",
          file=sys.stderr)
    for name, values in (("baseline", rates["baseline"]), ("step", rates["step"]),
                         ("trainer", trainer.rates), ("row cache", row_cached.rates)):
        if values:
            print(f"{name:10s} {statistics.median(values):12,.0f}   "
                  + " ".join(f"{r:,.0f}" for r in values), file=sys.stderr)
    print(f"step/base  {step_rate / base:12.2f}   (median of block-pair ratios {step_paired:.2f})",
          file=sys.stderr)
    print(f"train/base {mine / base:12.2f}   (median of segment/block ratios "
          f"{statistics.median(pairs['trainer']):.2f}); trainer data wait "
          f"{100 * plain['data_wait_fraction']:.1f}%, warm-up {plain['warmup_s']:.1f} s, final "
          f"checkpoints {plain['final_checkpoint_s']:.1f} s", file=sys.stderr)
    if cached is not None:
        print(f"rc/train   {cached['samples_per_s'] / mine:12.2f}   (median of segment-pair ratios "
              f"{statistics.median(pairs['row_cache']):.2f}); hit rate {cached['hit_rate']:.3f}, "
              f"store wait {cached['store_wait_ms_per_batch']:.1f} ms/batch, data wait "
              f"{100 * cached['data_wait_fraction']:.1f}%, cache {cache_rows:,} rows/table",
              file=sys.stderr)
    if args.json:
        print(orjson.dumps({
            "device": str(device), "baseline_samples_per_s": base, "samples_per_s": mine,
            "ratio": mine / base, "data_wait_fraction": plain["data_wait_fraction"],
            "row_cache_samples_per_s": None if cached is None else cached["samples_per_s"],
            "row_cache_ratio": None if cached is None else cached["samples_per_s"] / mine,
            "paired_ratio": statistics.median(pairs["trainer"]),
            "row_cache_paired_ratio": statistics.median(pairs["row_cache"]) if cached else None,
            "step_samples_per_s": step_rate, "step_ratio": step_rate / base, "step_paired_ratio": step_paired,
            "trainer": plain, "row_cache": cached, "row_cache_rows_per_table": cache_rows,
            "batch_size": shape.batch_size, "dim": shape.dim, "rows_cap": max(shape.rows),
            "tables": len(shape.rows), "total_rows": sum(shape.rows), "unique_rows_per_batch": unique,
            "bottom_mlp": shape.bottom_mlp, "top_mlp": shape.top_hidden + (1,),
            "threads": torch.get_num_threads(), "embedding_dtype": args.embedding_dtype,
            "precision": args.precision, "id_skew": args.id_skew, "interaction": args.interaction,
            "steps_per_block": steps,
            "blocks": rates,
        }).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
