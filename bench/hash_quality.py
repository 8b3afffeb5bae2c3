"""Model quality per id mapper and compression ratio: the same DLRM trained online on the
same stream with each mapper, at equal total memory (embedding table + mapper).

Protocol (identical for every mapper):

* The stream is split at ``--fit-fraction``: the *history* before it, the *evaluation*
  part after it. Mappers are fitted from the history's id statistics only (counts and
  labels); the learned mapper also uses the embeddings of an uncompressed reference model
  trained on the history (the paper's setup: "a model trained with a generous table").
* Compression ``k``: each feature gets the memory of ``ceil(distinct_ids_in_history / k)``
  embedding rows. With ``--memory total`` (the default) that is the budget for the table
  *and* the mapper (``total_bytes`` = ``table_bytes`` + ``mapper_bytes``, equal for every
  mapper at a ratio): the hashing tricks take all of it as rows; ``frequency`` and
  ``learned`` take the most rows that leave room for their id tables and codes
  (``hash_fit.fit_within_memory``; the learned mapper may use ``--mapper-share`` of the
  budget). ``--memory embedding`` gives every mapper the same rows and leaves the mapper's
  bytes uncounted. ``uncompressed`` gives every history id its own row (plus 1% rows for
  unseen ids).
* Each model trains one online pass over the whole stream from the same initial weights;
  the reported logloss and AUC are *progressive* (each batch scored before training on it)
  over the evaluation part.

Mappers: ``modulo`` (hashing trick), ``double`` (two hashes, rows summed), ``frequency``
(hot ids own rows, rest hashed), ``learned`` (hot ids own rows, other seen ids share rows
by mass-balanced clusters of similar ids; see ``transforms.hash_fit``).

    python bench/hash_quality.py [--quick] [--json]
    python bench/hash_quality.py --data log.jsonl --format jsonl --config C.toml [--json]

With ``--json`` the last line is ``{"rows": [{"mapper", "compression", "logloss", "auc",
"fit_s", "rows", "table_bytes", "mapper_bytes", "total_bytes", ...}], "ordering", "memory",
...}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.config import config_from_dict, load_config  # noqa: E402
from engine.errors import ConfigError, MappingError  # noqa: E402
from trainer.batch import Jagged  # noqa: E402
from trainer.metrics import exact_auc  # noqa: E402
from trainer.model import DLRM  # noqa: E402
from trainer.optim import build_optimizer, use_sparse_gradients  # noqa: E402
from transforms.hash_fit import (  # noqa: E402
    IdStats,
    LearnedFitParams,
    embedding_vectors,
    fit_frequency,
    fit_learned,
    fit_within_memory,
)
from transforms.mappers import DoubleHashMapper, IdMapper, ModuloMapper  # noqa: E402

__all__ = ["main"]

MAPPERS = ("modulo", "double", "frequency", "learned")


@dataclasses.dataclass
class Stream:
    """A labelled event stream as arrays: dense float32 [n, Nd] (log-scaled, no NaN),
    ids int64 [n, Ns] (hashed 64-bit ids), labels float32 [n]."""

    dense: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    features: tuple[str, ...]
    dense_names: tuple[str, ...]


def synthetic_stream(n: int, cardinality: int, num_sparse: int, seed: int) -> Stream:
    from streams.synthetic import SyntheticSpec, generate_arrays
    from transforms.hashing import hash_ints

    spec = SyntheticSpec(num_dense=4, num_sparse=num_sparse, cardinality=cardinality,
                         informative_sparse=max(1, num_sparse * 3 // 4), informative_dense=2,
                         groups_per_feature=max(4, cardinality // 100), signal_scale=1.0, seed=seed)
    a = generate_arrays(spec, n)
    dense = np.nan_to_num(np.sign(a.dense) * np.log1p(np.abs(a.dense)), nan=0.0).astype(np.float32)
    # salt per feature so equal raw ids of two features are different ids (as the pipeline does)
    ids = np.stack([hash_ints(a.ids[:, j] + (j << 40)) for j in range(num_sparse)], axis=1)
    return Stream(dense, ids, a.labels.astype(np.float32), tuple(f"c{j + 1}" for j in range(num_sparse)),
                  tuple(f"i{j + 1}" for j in range(4)))


def log_stream(path: str, cfg_path: str, limit: int) -> Stream:
    """Decode a real log with the pipeline's own decode path (``transforms.process``);
    dead letters are skipped and counted on stderr."""
    from transforms.elements import id_column
    from transforms.mappers import MappingSet
    from transforms.process import TransformSpec, process_batch, source_batch

    cfg = load_config(cfg_path)
    multi = [s.name for s in cfg.schema.sparse if s.multi]
    if multi:
        raise ConfigError(f"hash_quality: multi-valued features {multi} are not supported by this benchmark; "
                            "drop them from the config's schema")
    spec = TransformSpec.from_config(cfg)
    mappings = MappingSet.default(cfg.schema)
    opener = __import__("gzip").open if path.endswith(".gz") else open
    parts, dead, chunk, offset = [], 0, [], 0

    def flush():
        nonlocal dead, offset
        if not chunk:
            return
        pb = process_batch(source_batch(list(chunk), topic=f"file:{path}", start_offset=offset), spec, mappings)
        dead += len(pb.dead_letters)
        offset += len(chunk)
        chunk.clear()
        b = pb.batch
        parts.append((
            np.stack([b.column(d.name).to_numpy(zero_copy_only=False) for d in cfg.schema.dense], axis=1)
            if cfg.schema.dense else np.zeros((b.num_rows, 0), np.float32),
            np.stack([b.column(id_column(s.name)).to_numpy(zero_copy_only=False) for s in cfg.schema.sparse], axis=1),
            b.column(cfg.schema.label).to_numpy(zero_copy_only=False),
        ))

    with opener(path, "rb") as fh:
        for line in fh:
            chunk.append(line.rstrip(b"\r\n"))
            if len(chunk) == 8192:
                flush()
            if limit and offset + len(chunk) >= limit:
                break
    flush()
    if not parts:
        raise ConfigError(f"hash_quality: {path} holds no decodable events")
    print(f"decoded {sum(p[2].size for p in parts):,} events from {path} ({dead:,} dead letters skipped)",
          file=sys.stderr)
    dense = np.concatenate([p[0] for p in parts]).astype(np.float32)
    dense = np.nan_to_num(dense, nan=0.0)
    return Stream(dense, np.concatenate([p[1] for p in parts]).astype(np.int64),
                  np.concatenate([p[2] for p in parts]).astype(np.float32),
                  tuple(s.name for s in cfg.schema.sparse), tuple(d.name for d in cfg.schema.dense))


def model_config(stream: Stream, rows: dict[str, int], dim: int, seed: int):
    return config_from_dict({
        "schema": {"dense": [{"name": d} for d in stream.dense_names],
                   "sparse": [{"name": f, "rows": rows[f]} for f in stream.features]},
        "trainer": {"embedding_dim": dim, "bottom_mlp": [32, dim], "top_mlp": [32, 16],
                    "learning_rate": 0.05, "seed": seed},
    })


def train_online(stream: Stream, mappers: dict[str, IdMapper], dim: int, batch: int, eval_from: int,
                 seed: int, snapshot_at: int | None = None) -> dict[str, Any]:
    """One progressive pass; returns logloss/AUC over events >= eval_from, the train time,
    and (when ``snapshot_at``) the embedding tables after training on events < snapshot_at."""
    cfg = model_config(stream, {f: m.rows for f, m in mappers.items()}, dim, seed)
    torch.manual_seed(seed)
    model = DLRM.from_config(cfg)
    use_sparse_gradients(model)
    opt = build_optimizer(cfg.trainer.dense_optimizer_kind, model.parameters(), cfg.trainer.dense_lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rows = {}
    for j, f in enumerate(stream.features):
        r = mappers[f].map(np.ascontiguousarray(stream.ids[:, j]))
        rows[f] = torch.from_numpy(np.ascontiguousarray(r.T if r.ndim == 2 else r[:, None]))  # [n, lookups]
    dense = torch.from_numpy(stream.dense)
    labels = torch.from_numpy(stream.labels)
    n = labels.shape[0]
    logits_all = torch.empty(n)
    snapshot = None
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        if snapshot_at is not None and snapshot is None and lo >= snapshot_at:
            snapshot = {f: model.embeddings.bags[f].weight.detach().numpy().copy() for f in stream.features}
        sparse = {}
        for f, r in rows.items():
            k = r.shape[1]
            sparse[f] = Jagged(r[lo:hi].reshape(-1), torch.arange(0, (hi - lo) * k + 1, k))
        opt.zero_grad(set_to_none=True)
        logits = model(dense[lo:hi], sparse)
        loss = loss_fn(logits, labels[lo:hi])
        loss.backward()
        opt.step()
        logits_all[lo:hi] = logits.detach()
    train_s = time.perf_counter() - t0
    x = logits_all[eval_from:].numpy().astype(np.float64)
    y = stream.labels[eval_from:].astype(np.float64)
    logloss = float(np.mean(np.logaddexp(0.0, x) - y * x))
    return {"logloss": logloss, "auc": exact_auc(x, y), "train_s": train_s, "snapshot": snapshot}


def history_stats(stream: Stream, fit_until: int) -> dict[str, IdStats]:
    return {f: IdStats.from_events(stream.ids[:fit_until, j], stream.labels[:fit_until])
            for j, f in enumerate(stream.features)}


def fit_mappers(name: str, stats: dict[str, IdStats], budget_rows: dict[str, int], row_bytes: int,
                total_memory: bool, mapper_share: float, params: LearnedFitParams,
                embeddings: dict[str, np.ndarray], seed: int) -> dict[str, IdMapper]:
    """Mapper ``name`` for every feature. Equal embedding memory (``total_memory`` False):
    ``budget_rows[f]`` rows each. Equal total memory: the table plus the mapper fit in
    ``budget_rows[f] * row_bytes`` bytes (what the hashing trick's table takes), the learned
    mapper's table and codes within ``mapper_share`` of that."""
    out: dict[str, IdMapper] = {}
    for f, st in stats.items():
        rows, budget = budget_rows[f], budget_rows[f] * row_bytes
        if name == "modulo":
            out[f] = ModuloMapper(rows)
        elif name == "double":
            out[f] = DoubleHashMapper(rows)
        elif name == "frequency":
            def fit(r, st=st):
                return fit_frequency(st, r, hot_fraction=0.5, seed=seed + 2)
            out[f] = fit_within_memory(budget, row_bytes, fit) if total_memory else fit(rows)
        else:
            p = dataclasses.replace(params, mapper_bytes=int(mapper_share * budget)) if total_memory else params

            def fit(r, st=st, p=p, emb=embeddings[f]):
                return fit_learned(st, r, p, emb)
            out[f] = fit_within_memory(budget, row_bytes, fit) if total_memory else fit(rows)
    return out


def run(stream: Stream, compressions: list[int], mappers: list[str], dim: int, batch: int,
        fit_fraction: float, seed: int, total_memory: bool = True, mapper_share: float = 0.5) -> dict[str, Any]:
    n = stream.labels.shape[0]
    fit_until = int(n * fit_fraction)
    stats = history_stats(stream, fit_until)
    distinct = {f: s.distinct for f, s in stats.items()}
    print(f"{n:,} events, {len(stream.features)} sparse features, history {fit_until:,} events; distinct ids "
          f"in history per feature: {min(distinct.values()):,}..{max(distinct.values()):,}", file=sys.stderr)
    out_rows = []
    row_bytes = dim * 4

    def memory(ms: dict[str, IdMapper]) -> dict[str, int]:
        table = sum(m.rows for m in ms.values()) * row_bytes
        mapper = sum(m.nbytes for m in ms.values())
        return {"rows": sum(m.rows for m in ms.values()), "table_bytes": table, "mapper_bytes": mapper,
                "total_bytes": table + mapper}

    # uncompressed reference: every history id its own row, 1% (>= 1) rows for unseen ids
    t0 = time.perf_counter()
    ref_mappers = {f: fit_frequency(s, s.distinct + max(1, s.distinct // 100), hot_fraction=1.0, seed=seed + 1)
                   for f, s in stats.items()}
    ref_fit_s = time.perf_counter() - t0
    ref = train_online(stream, ref_mappers, dim, batch, fit_until, seed, snapshot_at=fit_until)
    out_rows.append({"mapper": "uncompressed", "compression": 1, "logloss": ref["logloss"], "auc": ref["auc"],
                     "fit_s": ref_fit_s, "train_s": ref["train_s"], **memory(ref_mappers)})
    print(f"  uncompressed: logloss {ref['logloss']:.5f} auc {ref['auc']:.4f} ({ref['train_s']:.1f} s)",
          file=sys.stderr)
    params = LearnedFitParams(seed=seed + 2)
    embeddings = {f: embedding_vectors(stats[f].ids, ref_mappers[f], ref["snapshot"][f], params.embedding_components)
                  for f in stream.features}
    for k in compressions:
        budget_rows = {f: max(2, math.ceil(d / k)) for f, d in distinct.items()}
        for name in mappers:
            t0 = time.perf_counter()
            ms = fit_mappers(name, stats, budget_rows, row_bytes, total_memory, mapper_share, params, embeddings, seed)
            fit_s = time.perf_counter() - t0
            res = train_online(stream, ms, dim, batch, fit_until, seed)
            mem = memory(ms)
            out_rows.append({"mapper": name, "compression": k, "logloss": res["logloss"], "auc": res["auc"],
                             "fit_s": fit_s, "train_s": res["train_s"], **mem})
            print(f"  1/{k:<3} {name:<10} logloss {res['logloss']:.5f} auc {res['auc']:.4f} rows {mem['rows']:,} "
                  f"mapper {mem['mapper_bytes'] / 1024:.1f} KiB fit {fit_s:.2f} s train {res['train_s']:.1f} s",
                  file=sys.stderr)
    return {"rows": out_rows, "events": n, "history_events": fit_until, "distinct_ids": distinct,
            "memory": "total" if total_memory else "embedding", "mapper_share": mapper_share}


def ordering(rows: list[dict[str, Any]], compressions: list[int]) -> dict[str, bool]:
    """Whether learned <= frequency <= modulo in logloss at each compression."""
    out = {}
    for k in compressions:
        ll = {r["mapper"]: r["logloss"] for r in rows if r["compression"] == k}
        if {"learned", "frequency", "modulo"} <= set(ll):
            out[str(k)] = ll["learned"] <= ll["frequency"] <= ll["modulo"]
    return out


def print_table(result: dict[str, Any]) -> None:
    print(f"{'mapper':<13}{'memory':>8}{'logloss':>10}{'AUC':>8}{'fit s':>8}{'train s':>9}{'rows':>9}"
          f"{'table KiB':>11}{'mapper KiB':>12}{'total KiB':>11}")
    for r in result["rows"]:
        comp = "1:1" if r["mapper"] == "uncompressed" else f"1/{r['compression']}"
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.4f}"
        print(f"{r['mapper']:<13}{comp:>8}{r['logloss']:>10.5f}{auc:>8}{r['fit_s']:>8.2f}{r['train_s']:>9.1f}"
              f"{r['rows']:>9,}{r['table_bytes'] / 1024:>11.1f}{r['mapper_bytes'] / 1024:>12.1f}"
              f"{r['total_bytes'] / 1024:>11.1f}")
    equal = "total (table + mapper)" if result["memory"] == "total" else "embedding-table"
    for k, ok in result["ordering"].items():
        print(f"learned <= frequency <= modulo at 1/{k} of {equal} memory: {'holds' if ok else 'does NOT hold'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a real log (JSON lines or TSV, optionally .gz); needs --config")
    ap.add_argument("--format", choices=["jsonl", "tsv"], help="format of --data (must match the config's schema)")
    ap.add_argument("--config", help="headrace config whose [schema] describes --data")
    ap.add_argument("--limit", type=int, default=0, help="read at most this many events of --data (0 = all)")
    ap.add_argument("--events", type=int, default=300_000, help="synthetic events")
    ap.add_argument("--cardinality", type=int, default=20_000, help="synthetic distinct ids per feature")
    ap.add_argument("--sparse", type=int, default=8, help="synthetic sparse features")
    ap.add_argument("--compressions", default="4,16,64", help="comma-separated ratios distinct/rows")
    ap.add_argument("--mappers", default=",".join(MAPPERS))
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--fit-fraction", type=float, default=0.3, help="share of the stream the mappers are fitted on")
    ap.add_argument("--memory", choices=["total", "embedding"], default="total",
                    help="what is equal across mappers at a ratio: table + mapper bytes, or table bytes only")
    ap.add_argument("--mapper-share", type=float, default=0.5,
                    help="share of the total memory the learned mapper's table and codes may take "
                         "(0.5 measured best at 1/16 and 1/64 on the synthetic stream; 0.15-0.35 lost)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training (0 = torch default)")
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    if args.quick:
        args.events, args.cardinality, args.sparse = 16_000, 1_000, 3
    compressions = [int(c) for c in args.compressions.split(",") if c]
    mappers = [m for m in args.mappers.split(",") if m]
    bad = [m for m in mappers if m not in MAPPERS]
    if bad or not compressions or min(compressions) < 1 or not 0 < args.fit_fraction < 1:
        ap.error(f"mappers must be among {MAPPERS} (got {bad}), compressions >= 1, fit-fraction in (0, 1)")
    if not 0 < args.mapper_share < 1:
        ap.error(f"--mapper-share must be in (0, 1), got {args.mapper_share}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.data:
            if not args.config or not args.format:
                ap.error("--data needs --format and --config")
            cfg = load_config(args.config)
            want = "json" if args.format == "jsonl" else "tsv"
            if cfg.schema.format.value != want:
                ap.error(f"--format {args.format} but the config's schema.format is {cfg.schema.format.value!r}")
            stream = log_stream(args.data, args.config, args.limit)
            source = {"data": args.data, "format": args.format}
        else:
            stream = synthetic_stream(args.events, args.cardinality, args.sparse, args.seed)
            source = {"synthetic": {"events": args.events, "cardinality": args.cardinality, "sparse": args.sparse}}
        t0 = time.perf_counter()
        result = run(stream, compressions, mappers, args.dim, args.batch, args.fit_fraction, args.seed,
                     total_memory=args.memory == "total", mapper_share=args.mapper_share)
    except (ConfigError, MappingError) as exc:
        print(f"hash_quality: {exc}", file=sys.stderr)
        return 2
    result["ordering"] = ordering(result["rows"], compressions)
    result["source"] = source
    result["elapsed_s"] = time.perf_counter() - t0
    print_table(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
