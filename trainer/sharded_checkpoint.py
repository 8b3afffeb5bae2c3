"""Sharded checkpoints of a sharded DLRM that load onto another world size or plan.

Layout of a checkpoint directory (one per checkpoint, written by every rank together)::

    shards-rank00000-of-00004.pt   each rank's model-parallel shards: rows/cols + weights
    ...                            + their optimizer state (same-shape tensors, e.g. Adagrad's
                                   sum, Adam's moments) + scalar state (step)
    dense.pt                       rank 0: dense parameters, buffers, replicated tables, and
                                   their optimizer state, by parameter name
    manifest.json                  written last by rank 0: world size, plan, files. A
                                   directory without it is an incomplete checkpoint.

A cached table (rows on SSD, ``trainer.cached_embedding``) is flushed and saved as its row
store's version; any rank may own it after a reshard because each cached table has its own
store directory (``row_cache.path/<table>``) that every rank of the host can open.

Resharding: every target shard ``rows x cols`` is assembled from the intersections of all
saved pieces of its table (files are opened with ``mmap`` so a rank reads only the bytes it
needs), and every cell must be covered exactly once or ``CheckpointError`` names the gap.
So a 4-rank checkpoint loads on 2 ranks, 1 rank, or under a different plan, with the same
weights and optimizer state, and training continues as if nothing changed.

Both functions are collectives over the default group (they barrier) when it is initialised.
The directory must be visible to every rank (a shared or local filesystem on one host).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import CheckpointError
from trainer.sharded_embedding import ShardedEmbeddingCollection
from trainer.sharding import find_sharded

__all__ = ["save_sharded_checkpoint", "load_sharded_checkpoint", "MANIFEST"]

MANIFEST = "manifest.json"
_FORMAT = 1


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _shard_file(rank: int, world: int) -> str:
    return f"shards-rank{rank:05d}-of-{world:05d}.pt"


def _opt_state(optimizer: torch.optim.Optimizer | None, p: torch.Tensor) -> tuple[dict, dict]:
    """(per-element tensors shaped like ``p``, everything else) of ``p``'s optimizer state."""
    if optimizer is None or p not in optimizer.state:
        return {}, {}
    full, scalar = {}, {}
    for k, v in optimizer.state[p].items():
        if torch.is_tensor(v) and v.shape == p.shape:
            full[k] = v.detach().cpu().clone()
        else:
            scalar[k] = v.detach().cpu().clone() if torch.is_tensor(v) else v
    return full, scalar


def _atomic_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_sharded_checkpoint(directory: str | os.PathLike, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> None:
    """Write this rank's shards (and, on rank 0, the dense part and ``extra``) to
    ``directory``; returns when every rank has written and the manifest exists."""
    directory = os.fspath(directory)
    net = _unwrap(model)
    emb = find_sharded(net)
    if emb is None:
        raise CheckpointError("model has no ShardedEmbeddingCollection; use the plain checkpoint")
    os.makedirs(directory, exist_ok=True)
    pieces = []
    for tp, s, p in emb.owned_shards():
        full, scalar = _opt_state(optimizer, p)
        pieces.append({"table": tp.name, "rows": [s.row_start, s.row_end], "cols": [s.col_start, s.col_end],
                       "weight": p.detach().cpu().clone(), "optim": full, "optim_scalar": scalar})
    for name, cached in emb.cached.items():
        # a cached table's rows are in its row store: the checkpoint names the store version
        cached.flush()
        pieces.append({"table": name, "cached": cached.checkpoint_state()})
    if emb.rank == 0:
        # replicated tables are saved once, as whole-table pieces, so that a later plan may
        # shard them (and a sharded table may become replicated)
        for name, weight in emb.replicated.items():
            full, scalar = _opt_state(optimizer, weight)
            pieces.append({"table": name, "rows": [0, weight.shape[0]], "cols": [0, weight.shape[1]],
                           "weight": weight.detach().cpu().clone(), "optim": full, "optim_scalar": scalar})
    _atomic_save({"format": _FORMAT, "rank": emb.rank, "pieces": pieces},
                 os.path.join(directory, _shard_file(emb.rank, emb.world_size)))
    if emb.rank == 0:
        mp = {id(p) for p in emb.parameters()}
        params, optim = {}, {}
        for name, p in net.named_parameters():
            if id(p) in mp:
                continue
            params[name] = p.detach().cpu().clone()
            optim[name] = _opt_state(optimizer, p)
        buffers = {n: b.detach().cpu().clone() for n, b in net.named_buffers()}
        _atomic_save({"format": _FORMAT, "params": params, "buffers": buffers, "optim": optim,
                      "extra": extra or {}}, os.path.join(directory, "dense.pt"))
    _barrier()
    if emb.rank == 0:
        manifest = {"format": _FORMAT, "world_size": emb.world_size, "plan": emb.plan.to_dict(),
                    "files": [_shard_file(r, emb.world_size) for r in range(emb.world_size)]}
        tmp = os.path.join(directory, MANIFEST + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(manifest, fh)
        os.replace(tmp, os.path.join(directory, MANIFEST))
    _barrier()


def load_sharded_checkpoint(directory: str | os.PathLike, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint written by any world size / plan into this rank's model and
    optimizer (the optimizer must already hold the model's parameters). Returns ``extra``."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: no {MANIFEST}; the checkpoint is missing or incomplete")
    with open(path) as fh:
        manifest = json.load(fh)
    if manifest.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this build reads {_FORMAT}")
    net = _unwrap(model)
    emb = find_sharded(net)
    if emb is None:
        raise CheckpointError("model has no ShardedEmbeddingCollection to load shards into")
    saved_tables = {t["name"]: (t["rows"], t["dim"]) for t in manifest["plan"]["tables"]}
    for tp in emb.plan.tables:
        if saved_tables.get(tp.name) != (tp.rows, tp.dim):
            raise CheckpointError(f"{directory}: table {tp.name!r} saved as {saved_tables.get(tp.name)}, "
                                  f"model has {(tp.rows, tp.dim)} (rows, dim)")
    dense = torch.load(os.path.join(directory, "dense.pt"), map_location="cpu", weights_only=True)
    _load_dense(dense, net, emb, optimizer, directory)
    owned = [(tp.name, s, p) for tp, s, p in emb.owned_shards()]
    owned += [(name, _Whole(w.shape[0], w.shape[1]), w) for name, w in emb.replicated.items()]
    if owned or len(emb.cached):
        sources = [torch.load(os.path.join(directory, f), map_location="cpu", mmap=True, weights_only=True)
                   for f in manifest["files"]]
        cached_states = {piece["table"]: piece["cached"] for src in sources for piece in src["pieces"]
                         if "cached" in piece}
        for name, cached in emb.cached.items():
            if name not in cached_states:
                raise CheckpointError(f"{directory}: table {name!r} is cached in this plan but was saved on "
                                      "devices; moving a table between device and cached placement is not "
                                      "supported by resharding (keep [row_cache] as it was when saving)")
            cached.load_checkpoint_state(cached_states[name])
        for name, s, p in owned:
            if name in cached_states:
                raise CheckpointError(f"{directory}: table {name!r} was saved as a cached table (rows in its "
                                      "row store) but this plan puts it on devices; keep [row_cache] as it was")
            weight, full, scalar = _assemble(name, s, p, sources, directory)
            with torch.no_grad():
                p.copy_(weight)
            _set_opt_state(optimizer, p, full, scalar)
    _barrier()
    return dense.get("extra", {})


class _Whole:
    """The geometry of a whole table, shaped like a ``ShardPlan`` for ``_assemble``."""

    def __init__(self, rows: int, cols: int):
        self.row_start, self.row_end, self.col_start, self.col_end = 0, rows, 0, cols
        self.rows, self.cols = rows, cols


def _assemble(table: str, s, p: torch.Tensor, sources: list[dict], directory: str):
    weight = torch.empty(s.rows, s.cols)
    covered = torch.zeros(s.rows, s.cols, dtype=torch.int32)
    full: dict[str, torch.Tensor] = {}
    scalar: dict = {}
    for src in sources:
        for piece in src["pieces"]:
            if piece["table"] != table or "cached" in piece:
                continue
            (r0, r1), (c0, c1) = piece["rows"], piece["cols"]
            lo_r, hi_r = max(r0, s.row_start), min(r1, s.row_end)
            lo_c, hi_c = max(c0, s.col_start), min(c1, s.col_end)
            if lo_r >= hi_r or lo_c >= hi_c:
                continue
            dst = (slice(lo_r - s.row_start, hi_r - s.row_start), slice(lo_c - s.col_start, hi_c - s.col_start))
            srcs = (slice(lo_r - r0, hi_r - r0), slice(lo_c - c0, hi_c - c0))
            weight[dst] = piece["weight"][srcs]
            covered[dst] += 1
            for k, v in piece["optim"].items():
                full.setdefault(k, torch.zeros(s.rows, s.cols, dtype=v.dtype))[dst] = v[srcs]
            scalar.update(piece["optim_scalar"])
    if not bool((covered == 1).all()):
        bad = int((covered != 1).sum())
        raise CheckpointError(f"{directory}: table {table!r} rows [{s.row_start}, {s.row_end}) cols "
                              f"[{s.col_start}, {s.col_end}): {bad} cells not covered exactly once by the saved shards")
    return weight.to(p.dtype), full, scalar


def _set_opt_state(optimizer, p: torch.Tensor, full: dict, scalar: dict) -> None:
    if optimizer is None or not (full or scalar):
        return
    state = {k: v.to(p.device) for k, v in full.items()}
    state.update({k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in scalar.items()})
    optimizer.state[p] = state


def _load_dense(dense: dict, net: nn.Module, emb: ShardedEmbeddingCollection, optimizer, directory: str) -> None:
    mp = {id(p) for p in emb.parameters()}
    params = dict(net.named_parameters())
    want = {n for n, p in params.items() if id(p) not in mp}
    missing = sorted(want - set(dense["params"]))
    if missing:
        raise CheckpointError(f"{directory}: dense.pt lacks parameter(s) {missing}")
    with torch.no_grad():
        for name in sorted(want):
            src = dense["params"][name]
            if src.shape != params[name].shape:
                raise CheckpointError(f"{directory}: {name} saved as {list(src.shape)}, model has "
                                      f"{list(params[name].shape)}")
            params[name].copy_(src)
            full, scalar = dense["optim"].get(name, ({}, {}))
            _set_opt_state(optimizer, params[name], full, scalar)
        bufs = dict(net.named_buffers())
        for name, b in dense["buffers"].items():
            if name in bufs:
                bufs[name].copy_(b)
