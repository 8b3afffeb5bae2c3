"""Sharded checkpoints of a sharded DLRM that load onto another world size or plan.

Layout of a checkpoint directory (one per checkpoint, written by every rank together)::

    shards-rank00000-of-00004.pt   each rank's model-parallel shards, as pieces: table,
    ...                            rows/cols, weights (the embedding dtype) and their sparse
                                   optimizer state (fp32: one value per row for row-wise
                                   Adagrad, else one per weight)
    dense.pt                       rank 0: dense parameters and buffers and their (dense)
                                   optimizer state, by name; replicated tables are pieces of
                                   rank 0's shard file
    manifest.json                  written last by rank 0: format, world size, plan, files,
                                   the sparse optimizer and its step count, and per sharded
                                   collection of the model (``collections``: the embeddings
                                   and the first-order rows) its plan and step count. A
                                   directory without it is an incomplete checkpoint.

Each piece names its collection (the module path, ``embeddings`` or
``first_order.embeddings``): the two hold tables of the same names.

A cached table (rows on SSD, ``trainer.cached_embedding``) is flushed and saved as its row
store's version; any rank may own it after a reshard because each cached table has its own
store directory (``row_cache.path/<table>``) that every rank of the host can open.

Resharding: every target shard ``rows x cols`` is assembled from the intersections of all
saved pieces of its table (files are opened with ``mmap`` so a rank reads only the bytes it
needs), and every weight must be covered exactly once or ``CheckpointError`` names the gap.
Optimizer state follows its weights: per-weight state (Adagrad, Adam) is sliced the same
way; per-row state (row-wise Adagrad) by rows, from any piece that holds the row (the
column shards of a table keep equal per-row state, see ``trainer.sharded_embedding``). So a
4-rank checkpoint loads on 2 ranks, 1 rank, or under a different plan, with the same weights,
optimizer state and step, and training continues as if nothing changed.

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

from storage.atomic import atomic_write, atomic_write_bytes
from trainer.errors import CheckpointError
from trainer.sharded_embedding import ShardedEmbeddingCollection, ShardView
from trainer.sharding import find_all_sharded

__all__ = ["save_sharded_checkpoint", "load_sharded_checkpoint", "gather_tables", "MANIFEST"]

MANIFEST = "manifest.json"
# 3: several sharded collections (the embeddings and the first-order rows), each piece naming
# its collection, the manifest each collection's plan and step count; 2 (read too): one
# collection, ``embeddings``. 2: shards in fused tables with their own sparse optimizer state
# (1: nn.Parameter shards trained by the dense torch optimizer, whose state was saved beside them).
_FORMAT = 3
#: The module path of the embedding tables' collection (format 2 checkpoints hold only it).
MAIN_COLLECTION = "embeddings"


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
    # Atomic but not durable: ShardedCheckpointManager fsyncs every file and the directory
    # once, after all ranks wrote, before it renames the directory into place.
    atomic_write(path, lambda fh: torch.save(obj, fh), durable=False)


def _embedding_tensors(collections) -> set[int]:
    """Ids of the collections' parameters and buffers: stored as pieces, not in dense.pt."""
    out: set[int] = set()
    for emb in collections:
        out |= {id(t) for t in emb.parameters()} | {id(t) for t in emb.buffers()}
    return out


def _sharded_collections(net: nn.Module, what: str) -> dict[str, ShardedEmbeddingCollection]:
    found = find_all_sharded(net)
    if not found:
        raise CheckpointError(f"model has no ShardedEmbeddingCollection{what}")
    return found


def _piece_collection(piece: dict) -> str:
    # format 2 pieces carry no collection: the model had one, ``embeddings``
    return piece.get("collection", MAIN_COLLECTION)


def save_sharded_checkpoint(directory: str | os.PathLike, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> None:
    """Write this rank's shards of every sharded collection of the model (and, on rank 0, the
    replicated tables, the dense part and ``extra``) to ``directory``; returns when every
    rank has written and the manifest exists. ``optimizer`` is the dense optimizer; the
    embeddings' sparse optimizer state is the collections' own."""
    directory = os.fspath(directory)
    net = _unwrap(model)
    collections = _sharded_collections(net, "; use the plain checkpoint")
    first = next(iter(collections.values()))
    rank, world = first.rank, first.world_size
    os.makedirs(directory, exist_ok=True)
    pieces = []
    for prefix, emb in collections.items():
        for v in emb.shard_views():
            if v.replicated and rank != 0:
                continue  # saved once, as whole-table pieces, so a later plan may shard them
            pieces.append({"collection": prefix, "table": v.table, "rows": [v.row_start, v.row_end],
                           "cols": [v.col_start, v.col_end], "weight": v.weight.detach().cpu().clone(),
                           "state": {k: t.detach().cpu().clone() for k, t in v.state.items()}})
        for name, cached in emb.cached.items():
            # a cached table's rows are in its row store: the checkpoint names the store version
            cached.flush()
            pieces.append({"collection": prefix, "table": name, "cached": cached.checkpoint_state()})
    _atomic_save({"format": _FORMAT, "rank": rank, "pieces": pieces},
                 os.path.join(directory, _shard_file(rank, world)))
    if rank == 0:
        skip = _embedding_tensors(collections.values())
        params, optim = {}, {}
        for name, p in net.named_parameters():
            if id(p) in skip:
                continue
            params[name] = p.detach().cpu().clone()
            optim[name] = _opt_state(optimizer, p)
        buffers = {n: b.detach().cpu().clone() for n, b in net.named_buffers() if id(b) not in skip}
        _atomic_save({"format": _FORMAT, "params": params, "buffers": buffers, "optim": optim,
                      "extra": extra or {}}, os.path.join(directory, "dense.pt"))
    _barrier()
    if rank == 0:
        main = collections.get(MAIN_COLLECTION, first)
        # "plan" and "sparse_steps" are the main collection's, as format 2 wrote them
        manifest = {"format": _FORMAT, "world_size": world, "plan": main.plan.to_dict(),
                    "files": [_shard_file(r, world) for r in range(world)],
                    "sparse_optimizer": first.optimizer.kind.value, "sparse_steps": main.sparse_steps,
                    "collections": {prefix: {"plan": emb.plan.to_dict(), "sparse_steps": emb.sparse_steps}
                                    for prefix, emb in collections.items()}}
        atomic_write_bytes(os.path.join(directory, MANIFEST), json.dumps(manifest).encode(), durable=False)
    _barrier()


def load_sharded_checkpoint(directory: str | os.PathLike, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint written by any world size / plan into this rank's model and dense
    ``optimizer`` (which must already hold the model's dense parameters). Returns ``extra``.
    Raises ``CheckpointError`` when it does not fit; its format, collections, table shapes
    and sparse optimizer are checked before anything is modified."""
    directory = os.fspath(directory)
    manifest = _read_manifest(directory)
    net = _unwrap(model)
    collections = _sharded_collections(net, " to load shards into")
    saved = manifest.get("collections") or {
        MAIN_COLLECTION: {"plan": manifest["plan"], "sparse_steps": manifest["sparse_steps"]}}
    if set(saved) != set(collections):
        raise CheckpointError(
            f"{directory}: saved embedding collections {sorted(saved)}, the model has {sorted(collections)}; "
            f"a checkpoint without first_order.embeddings was written without the first-order part: "
            "resume it with [model] wide = false, or start a new checkpoint_dir")
    for prefix, emb in collections.items():
        saved_tables = {t["name"]: (t["rows"], t["dim"]) for t in saved[prefix]["plan"]["tables"]}
        for tp in emb.plan.tables:
            if saved_tables.get(tp.name) != (tp.rows, tp.dim):
                raise CheckpointError(f"{directory}: {prefix} table {tp.name!r} saved as "
                                      f"{saved_tables.get(tp.name)}, model has {(tp.rows, tp.dim)} (rows, dim)")
        if manifest["sparse_optimizer"] != emb.optimizer.kind.value:
            raise CheckpointError(
                f"{directory}: embeddings were trained with sparse optimizer {manifest['sparse_optimizer']!r}, "
                f"this model uses {emb.optimizer.kind.value!r}; keep [trainer] sparse_optimizer or start a "
                "new checkpoint_dir")
    dense = torch.load(os.path.join(directory, "dense.pt"), map_location="cpu", weights_only=True)
    _load_dense(dense, net, collections.values(), optimizer, directory)
    sources = None
    for prefix, emb in collections.items():
        views = emb.shard_views()
        if views or len(emb.cached):
            if sources is None:
                sources = [torch.load(os.path.join(directory, f), map_location="cpu", mmap=True, weights_only=True)
                           for f in manifest["files"]]
            _load_collection(emb, prefix, views, sources, directory)
        emb.set_sparse_steps(int(saved[prefix]["sparse_steps"]))
    _barrier()
    return dense.get("extra", {})


def _load_collection(emb: ShardedEmbeddingCollection, prefix: str, views: list[ShardView],
                     sources: list[dict], directory: str) -> None:
    """This rank's shards and cached tables of one collection from the saved pieces."""
    cached_states = {piece["table"]: piece["cached"] for src in sources for piece in src["pieces"]
                     if "cached" in piece and _piece_collection(piece) == prefix}
    for name, cached in emb.cached.items():
        if name not in cached_states:
            raise CheckpointError(f"{directory}: table {name!r} is cached in this plan but was saved on "
                                  "devices; moving a table between device and cached placement is not "
                                  "supported by resharding (keep [row_cache] as it was when saving)")
        cached.load_checkpoint_state(cached_states[name])
    for v in views:
        if v.table in cached_states:
            raise CheckpointError(f"{directory}: table {v.table!r} was saved as a cached table (rows in "
                                  "its row store) but this plan puts it on devices; keep [row_cache] as it was")
        weight, state = _assemble(v, sources, directory, prefix)
        with torch.no_grad():
            v.weight.copy_(weight)
            for k, t in v.state.items():
                t.copy_(state[k])


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: no {MANIFEST}; the checkpoint is missing or incomplete")
    with open(path) as fh:
        manifest = json.load(fh)
    found = manifest.get("format")
    if found == 1:
        raise CheckpointError(
            f"{path}: sharded checkpoint format 1, written when shards were parameters of the dense "
            "torch optimizer; this release trains them with [trainer] sparse_optimizer and cannot "
            "resume that state. Point trainer.checkpoint_dir at a new directory")
    if found not in (2, _FORMAT):
        raise CheckpointError(f"{path}: format {found!r}, this build reads 2 and {_FORMAT}")
    return manifest


def gather_tables(directory: str | os.PathLike, collection: str = MAIN_COLLECTION
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every table of one sharded collection of the checkpoint in ``directory`` (by module
    path: ``embeddings``, or ``first_order.embeddings`` for the first-order rows), whole, in
    one process (no process group; for export): ``({table: weights [rows, dim] in the saved
    dtype}, {cached table: the row-store state its piece names})``. Device tables are
    reassembled from every rank's pieces as a load onto one rank would (each weight covered
    exactly once). A collection the checkpoint does not hold gives ``({}, {})``."""
    directory = os.fspath(directory)
    manifest = _read_manifest(directory)
    saved = manifest.get("collections") or {MAIN_COLLECTION: {"plan": manifest["plan"]}}
    if collection not in saved:
        return {}, {}
    sources = [torch.load(os.path.join(directory, f), map_location="cpu", mmap=True, weights_only=True)
               for f in manifest["files"]]
    mine = [piece for src in sources for piece in src["pieces"] if _piece_collection(piece) == collection]
    cached = {piece["table"]: piece["cached"] for piece in mine if "cached" in piece}
    dtypes = {piece["table"]: piece["weight"].dtype for piece in mine if "cached" not in piece}
    tables = {}
    for t in saved[collection]["plan"]["tables"]:
        if t["name"] in cached:
            continue
        whole = ShardView(t["name"], 0, t["rows"], 0, t["dim"],
                          torch.empty(0, dtype=dtypes.get(t["name"], torch.float32)), {})
        tables[t["name"]] = _assemble(whole, sources, directory, collection)[0]
    return tables, cached


def _assemble(v: ShardView, sources: list[dict], directory: str, collection: str = MAIN_COLLECTION
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weights and optimizer state of target ``v`` from every saved piece of its table in
    ``collection`` (the module path of its sharded collection)."""
    rows, cols = v.row_end - v.row_start, v.col_end - v.col_start
    weight = torch.empty(rows, cols, dtype=v.weight.dtype)
    covered = torch.zeros(rows, cols, dtype=torch.int32)
    state = {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in v.state.items()}
    state_rows = {k: torch.zeros(rows, dtype=torch.bool) for k, t in v.state.items() if t.dim() == 1}
    for src in sources:
        for piece in src["pieces"]:
            if piece["table"] != v.table or "cached" in piece or _piece_collection(piece) != collection:
                continue
            (r0, r1), (c0, c1) = piece["rows"], piece["cols"]
            lo_r, hi_r = max(r0, v.row_start), min(r1, v.row_end)
            lo_c, hi_c = max(c0, v.col_start), min(c1, v.col_end)
            if lo_r >= hi_r or lo_c >= hi_c:
                continue
            dst_r, src_r = slice(lo_r - v.row_start, hi_r - v.row_start), slice(lo_r - r0, hi_r - r0)
            dst = (dst_r, slice(lo_c - v.col_start, hi_c - v.col_start))
            srcs = (src_r, slice(lo_c - c0, hi_c - c0))
            weight[dst] = piece["weight"][srcs]  # cast to this model's dtype if it differs
            covered[dst] += 1
            for k, target in state.items():
                saved = piece["state"].get(k)
                if saved is None:
                    continue
                if k in state_rows:  # one value per row, the same in every column piece
                    target[dst_r] = saved[src_r]
                    state_rows[k][dst_r] = True
                else:
                    target[dst] = saved[srcs]
    where = (f"{directory}: table {v.table!r} rows [{v.row_start}, {v.row_end}) cols "
             f"[{v.col_start}, {v.col_end})")
    if not bool((covered == 1).all()):
        bad = int((covered != 1).sum())
        raise CheckpointError(f"{where}: {bad} cells not covered exactly once by the saved shards")
    for k, seen in state_rows.items():
        if not bool(seen.all()):
            raise CheckpointError(f"{where}: optimizer state {k!r} missing for {int((~seen).sum())} rows")
    return weight, state


def _set_opt_state(optimizer, p: torch.Tensor, full: dict, scalar: dict) -> None:
    if optimizer is None or not (full or scalar):
        return
    state = {k: v.to(p.device) for k, v in full.items()}
    state.update({k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in scalar.items()})
    optimizer.state[p] = state


def _load_dense(dense: dict, net: nn.Module, collections, optimizer, directory: str) -> None:
    skip = _embedding_tensors(collections)
    params = dict(net.named_parameters())
    want = {n for n, p in params.items() if id(p) not in skip}
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
        bufs = {n: b for n, b in net.named_buffers() if id(b) not in skip}
        for name, b in dense["buffers"].items():
            if name in bufs:
                bufs[name].copy_(b)
