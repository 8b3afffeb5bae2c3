"""A trained model's parameters out of its checkpoint, in the form an export package holds.

``snapshot_from_checkpoint(spec)`` reads the newest checkpoint of ``trainer.checkpoint_dir``
(or a given one) of any placement and returns a ``ModelSnapshot``: the dense state (every
state-dict entry outside the embedding collections) and every table whole, keyed by the
collection's module path and the table name, plus the counters, cursor and metrics:

* plain: the checkpoint's state dict, loaded into the model the trainer builds
  (``plain_model``);
* row-cached (``[row_cache] enabled``): the dense part from the state dict, the rows from
  the row store as of the version the checkpoint names (``storage.row_store_snapshot``:
  read-only, so a trainer may go on writing the store meanwhile);
* sharded: the dense part from ``dense.pt``, each table gathered from every rank's pieces
  (``trainer.sharded_checkpoint.gather_tables``), cached tables from their stores.

Collections are found generically (``collection_paths``: every embedding collection of
the model, keyed by module path), so a model with more than one (e.g. a wide part's 1-dim
tables beside the DLRM's) exports all of them. ``package_tables`` turns a snapshot's tables
into package arrays (fp32, fp16 or bf16), whole or as the rows that differ bitwise from a
previous package's tables.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from storage.model_package import TableEntry, array_writer, table_files
from storage.row_store_snapshot import read_weights_at
from trainer.checkpoint import _check_compatible, _check_format, latest_checkpoint, latest_sharded_checkpoint
from trainer.config import TrainSpec
from trainer.embedding import TableSpec, collections_of, init_rows
from trainer.errors import CheckpointError, TrainerError
from trainer.first_order import first_order_spec
from trainer.metrics import ProgressiveMetrics
from trainer.migrate import model_tables
from trainer.model import build_model, model_shape

__all__ = [
    "ModelSnapshot", "EXPORT_DTYPES", "plain_model", "collection_paths", "snapshot_from_checkpoint",
    "split_state", "load_dense", "table_views", "package_tables", "stored_array", "table_tensor", "dense_bytes",
]

#: Package table dtype -> (torch dtype, numpy dtype of the stored array).
EXPORT_DTYPES = {"fp32": (torch.float32, np.float32), "fp16": (torch.float16, np.float16),
                 "bf16": (torch.bfloat16, np.int16)}


@dataclasses.dataclass
class ModelSnapshot:
    """One trained state: ``dense`` state-dict entries, ``tables[collection][table]`` whole
    ([rows, dim], CPU, their trained dtype), and where the state came from."""

    dense: dict[str, Any]
    tables: dict[str, dict[str, torch.Tensor]]
    counters: dict[str, Any]
    metrics: dict[str, Any] | None
    cursor: dict[str, int]
    checkpoint: str


def plain_model(spec: TrainSpec) -> nn.Module:
    """The model the trainer builds for ``spec`` (``trainer.model.build_model``) with every
    collection placed in memory by the loop's own placement (fused tables; no sharding, no
    row cache), on the CPU."""
    from trainer.loop import _placed_collections  # the single-process placement the loop uses

    spec = dataclasses.replace(spec, sharding=dataclasses.replace(spec.sharding, enabled=False),
                               row_cache=dataclasses.replace(spec.row_cache, enabled=False))
    return build_model(spec, *_placed_collections(spec, torch.device("cpu")))


def collection_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every embedding collection of ``model`` keyed by its module path."""
    return collections_of(model)


def _inside(key: str, paths) -> bool:
    return any(key == p or key.startswith(p + ".") for p in paths)


def table_views(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{collection path: {table: rows}}``: views that write through to the model."""
    return {p: {name: w for name, (w, _) in model_tables(c).items()} for p, c in collection_paths(model).items()}


def split_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(dense state-dict entries, ``{collection path: {table: rows}}``) of ``model``, copies."""
    colls = collection_paths(model)
    dense = {k: (v.detach().clone() if torch.is_tensor(v) else v)
             for k, v in model.state_dict().items() if not _inside(k, colls)}
    tables = {p: {name: w.detach().clone() for name, w in named.items()} for p, named in table_views(model).items()}
    return dense, tables


def load_dense(model: nn.Module, dense: Mapping[str, Any], where: str) -> None:
    """Load dense state entries into ``model``; every entry outside its collections must fit."""
    colls = collection_paths(model)
    own = set(model.state_dict())
    result = model.load_state_dict({k: v for k, v in dense.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if not _inside(k, colls)]
    extra = [k for k in dense if k not in own]
    if missing or extra or result.unexpected_keys:
        raise CheckpointError(f"{where} does not fit the model: missing {missing}, unexpected "
                              f"{extra + list(result.unexpected_keys)}")


def _placement_spec(spec: TrainSpec, path: str) -> TrainSpec:
    """The config the placement factories build the collection at ``path`` from (the
    first-order tables' row stores live under ``<row_cache.path>/first_order``)."""
    return first_order_spec(spec) if path == "first_order.embeddings" else spec


@torch.no_grad()
def _fill_from_store(views: Mapping[str, torch.Tensor], tables: Mapping[str, TableSpec], seed: int,
                     store_dir: str, state: Mapping[str, Any]) -> None:
    """Copy the rows a row store held at the checkpoint's version into ``views``."""
    def initializer(table: str, rows: np.ndarray) -> np.ndarray:
        return init_rows(tables[table], torch.from_numpy(rows), seed).numpy()

    rows = read_weights_at(store_dir, int(state["version"]), initializer, store_id=state["store_id"])
    for name, weights in rows.items():
        if name not in views:
            raise CheckpointError(f"row store {store_dir} holds table {name!r}, which the model lacks")
        views[name].copy_(torch.from_numpy(weights))


def _collection_tables(model: nn.Module, path: str) -> dict[str, TableSpec]:
    return {t.name: t for t in collection_paths(model)[path].tables}


def _metrics_summary(state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not state:
        return None
    metrics = ProgressiveMetrics(int(state["window_samples"]), int(state["auc_bins"]))
    metrics.load_state_dict(dict(state))
    return metrics.summary()


def _load_plain(model: nn.Module, spec: TrainSpec, path: Path) -> dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} disappeared (pruned by a newer one?); export again",
                              retriable=True) from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    _check_format(path, blob.get("format_version"))
    _check_compatible(path, blob["model_shape"], blob["optimizer_kind"], model_shape(spec), _optimizer_kind(spec))
    # trainer.checkpoint keeps the rows of a self-checkpointing (row-cached) collection at
    # path P outside the state dict, and its store's state under "P_state"
    own = {p: blob[f"{p}_state"] for p in collection_paths(model) if f"{p}_state" in blob}
    state = {k: v for k, v in blob["model"].items() if not _inside(k, own)}
    load_dense(model, state, f"checkpoint {path}")
    views = table_views(model)
    for p, store_state in own.items():
        _fill_from_store(views[p], _collection_tables(model, p), spec.trainer.seed,
                         _placement_spec(spec, p).row_cache.path, store_state)
    return blob


def _load_sharded(model: nn.Module, spec: TrainSpec, path: Path) -> dict[str, Any]:
    from trainer.sharded_checkpoint import gather_tables

    dense = torch.load(path / "dense.pt", map_location="cpu", weights_only=True)
    extra = dense.get("extra") or {}
    _check_format(path, extra.get("format_version"))
    _check_compatible(path, extra["model_shape"], extra["optimizer_kind"], model_shape(spec), _optimizer_kind(spec))
    own = set(model.state_dict())
    load_dense(model, {**dense["params"], **{k: v for k, v in dense["buffers"].items() if k in own}},
               f"checkpoint {path}/dense.pt")
    views = table_views(model)
    for p, named in views.items():
        device_tables, cached = gather_tables(path, p)
        for name, weight in device_tables.items():
            if name not in named:
                raise CheckpointError(f"sharded checkpoint {path} holds {p} table {name!r}, which the model lacks")
            with torch.no_grad():
                named[name].copy_(weight)
        for name, store_state in cached.items():
            store = os.path.join(_placement_spec(spec, p).row_cache.path, name)
            _fill_from_store(named, _collection_tables(model, p), spec.trainer.seed, store, store_state)
        missing = set(named) - set(device_tables) - set(cached)
        if missing:
            raise CheckpointError(f"sharded checkpoint {path} lacks {p} table(s) {sorted(missing)}")
    return extra


def _optimizer_kind(spec: TrainSpec) -> str:
    t = spec.trainer
    return f"sparse={t.sparse_optimizer_kind.value},dense={t.dense_optimizer_kind.value}"


def snapshot_from_checkpoint(spec: TrainSpec, checkpoint: str | os.PathLike[str] | None = None) -> ModelSnapshot:
    """The trained state of ``checkpoint`` (a ``ckpt-*.pt`` file or ``sharded-*`` directory;
    default: the newest in ``trainer.checkpoint_dir``, sharded ones when ``[sharding]
    enabled``). ``CheckpointError`` when there is none or it does not fit ``spec``;
    ``retriable`` when a trainer moved on while it was read (try again)."""
    if checkpoint is None:
        directory = spec.trainer.checkpoint_dir
        found = latest_sharded_checkpoint(directory) if spec.sharding.enabled else latest_checkpoint(directory)
        if found is None:
            raise CheckpointError(f"no {'sharded ' if spec.sharding.enabled else ''}checkpoint in {directory!r} "
                                  "to export; train first (serve or train), or pass --checkpoint")
        checkpoint = found
    path = Path(checkpoint)
    if not path.exists():
        # in the checkpoint directory: pruned by a newer one since it was listed, try again
        pruned = path.parent.resolve() == Path(spec.trainer.checkpoint_dir).resolve()
        raise CheckpointError(f"checkpoint {path} does not exist (a ckpt-*.pt file or a sharded-* directory "
                              "of trainer.checkpoint_dir)", retriable=pruned)
    model = plain_model(spec)
    blob = _load_sharded(model, spec, path) if path.is_dir() else _load_plain(model, spec, path)
    dense, tables = split_state(model)
    return ModelSnapshot(dense, tables, dict(blob["counters"]), _metrics_summary(blob.get("metrics")),
                         dict(blob["cursor"]), str(path))


def stored_array(rows: torch.Tensor, dtype: str) -> np.ndarray:
    """A table's rows as the package stores them in ``dtype`` (bf16: int16 bit patterns)."""
    torch_dtype, np_dtype = EXPORT_DTYPES[dtype]
    t = rows.detach().to("cpu", torch_dtype).contiguous()
    return (t.view(torch.int16) if dtype == "bf16" else t).numpy().astype(np_dtype, copy=False)


def table_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of ``stored_array``: package rows as a tensor of ``dtype``."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.view(torch.bfloat16) if dtype == "bf16" else t


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def package_tables(tables: Mapping[str, Mapping[str, torch.Tensor]], dtype: str,
                   previous: Mapping[str, Mapping[str, np.ndarray]] | None = None
                   ) -> tuple[dict[str, Any], dict[str, dict[str, dict]], int]:
    """(package files, manifest ``tables`` entry, rows written) for ``tables`` in ``dtype``:
    every row, or with ``previous`` (the tables of the package a delta follows, as stored)
    only the rows that differ bitwise from it. A table whose shape or dtype differs from
    ``previous`` cannot be a delta (``TrainerError``: export a full package)."""
    if dtype not in EXPORT_DTYPES:
        raise TrainerError(f"export dtype {dtype!r}: use one of {sorted(EXPORT_DTYPES)}")
    files: dict[str, Any] = {}
    entries: dict[str, dict[str, dict]] = {}
    written = 0
    for coll, named in tables.items():
        for name, rows in named.items():
            arr = stored_array(rows, dtype)
            whole, rows_file, values_file = table_files(coll, name)
            if previous is None:
                files[whole] = array_writer(arr)
                entries.setdefault(coll, {})[name] = TableEntry(arr.shape[0], arr.shape[1], dtype).to_json()
                written += arr.shape[0]
                continue
            base = previous.get(coll, {}).get(name)
            if base is None or base.shape != arr.shape or base.dtype != arr.dtype:
                raise TrainerError(
                    f"table {coll}/{name} is {arr.dtype}{list(arr.shape)} now but "
                    f"{None if base is None else f'{base.dtype}{list(base.shape)}'} in the package a delta "
                    "would follow; export a full package")
            changed = np.flatnonzero((_bits(arr) != _bits(base)).any(axis=1)).astype(np.int64)
            files[rows_file] = array_writer(changed)
            files[values_file] = array_writer(arr[changed])
            entries.setdefault(coll, {})[name] = TableEntry(arr.shape[0], arr.shape[1], dtype,
                                                            changed=int(changed.size)).to_json()
            written += int(changed.size)
    return files, entries, written


def dense_bytes(dense: Mapping[str, Any]) -> bytes:
    """The dense state as the package's ``dense.pt`` (``torch.load(..., weights_only=True)``)."""
    buf = io.BytesIO()
    torch.save(dict(dense), buf)
    return buf.getvalue()
