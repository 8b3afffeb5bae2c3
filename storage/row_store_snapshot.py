"""Read a row store's rows as of a committed version, read-only, while its trainer writes.

``storage.row_store.RowStore`` is the writer: opening one rolls back the uncommitted epoch
and may restore versions, so a second process must never open a store a trainer is using.
``read_weights_at`` instead reads the files as they are and undoes, in memory, what was
written since ``version`` was committed:

* the table files hold the newest values (committed or not);
* the undo log of the current epoch (``undo-<current>.log``) holds, for every row written
  since the current version was committed, its record at that commit; the log of the
  previous epoch (kept until the next commit) holds the records at the previous commit.

So the rows at the current version are the files with the current epoch's log applied, and
the rows at the previous version are those with the previous epoch's log applied on top.
Older versions are gone (``CheckpointError``: export from a newer checkpoint).

Concurrency: the writer appends a row's old record to the undo log (and syncs it) *before*
overwriting the row, so reading the files first and the logs afterwards sees every row that
changed during the read in the log (its logged record wins, and it is the committed value).
A commit between the two reads seals a log this read did not see in full: the manifest is
read before and after, and ``CheckpointError(retriable=True)`` says to try again when the
version moved. Never-written rows (file holes) come from ``initializer`` as in ``RowStore``.
"""

from __future__ import annotations

import os

import numpy as np

from storage.errors import CheckpointError
from storage.row_store import RowInitializer, read_store_manifest
from storage.row_store_format import (
    FLAG_MATERIALIZED,
    MANIFEST_NAME,
    UNDO_HEADER_BYTES,
    RowTableSpec,
    decode_undo_chunks,
    decode_undo_header,
    table_file_name,
    undo_file_name,
)

__all__ = ["read_weights_at"]


def _manifest(path: str) -> dict:
    manifest = read_store_manifest(path)
    if manifest is None:
        raise CheckpointError(f"{path}: no row store ({MANIFEST_NAME} missing); the checkpoint's rows "
                              "are not there: point [row_cache] path at the store it was trained with")
    return manifest


def _apply_undo(path: str, epoch: int, specs: list[RowTableSpec], records: dict[str, np.ndarray]) -> None:
    file = os.path.join(path, undo_file_name(epoch))
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return  # nothing was written in that epoch
    if len(data) < UNDO_HEADER_BYTES:
        return  # being created: nothing overwritten yet
    try:
        if decode_undo_header(data[:UNDO_HEADER_BYTES], file) != len(specs):
            raise ValueError(f"{file}: logged for a different number of tables")
        for index, entries in decode_undo_chunks(data, [s.record_floats for s in specs]):
            records[specs[index].name][entries["row"]] = entries["record"]
    except ValueError as exc:
        raise CheckpointError(f"row store undo log is corrupt: {exc}") from None


def read_weights_at(path: str | os.PathLike[str], version: int, initializer: RowInitializer, *,
                    store_id: str | None = None) -> dict[str, np.ndarray]:
    """``{table: float32 [rows, dim]}``: every row of every table of the store at ``path`` as
    committed in ``version`` (the current or the previous version; 0 = all initial), without
    opening the store for writing (see the module docstring). ``store_id``: the store the
    caller's checkpoint names; another store is a ``CheckpointError``. Memory: one copy of
    every table's records."""
    path = os.fspath(path)
    before = _manifest(path)
    if store_id is not None and before.get("store_id") != store_id:
        raise CheckpointError(f"row store {path} is store {before.get('store_id')}, the checkpoint was "
                              f"written with store {store_id}; point [row_cache] path at that store")
    specs = [RowTableSpec(**t) for t in before["tables"]]
    current, previous = before["version"], before.get("previous")
    if version != 0 and version not in (current, previous):
        raise CheckpointError(
            f"row store {path} is at version {current} (previous {previous}); version {version} of the "
            "checkpoint is gone: export from a newer checkpoint", retriable=True)
    if before.get("restoring_to") is not None:
        raise CheckpointError(f"row store {path} is being restored; try again", retriable=True)
    records = {}
    if version != 0:
        for spec in specs:
            mm = np.memmap(os.path.join(path, table_file_name(spec.name)), dtype=np.float32, mode="r",
                           shape=(spec.rows, spec.record_floats))
            records[spec.name] = np.array(mm)
            del mm
        _apply_undo(path, current, specs, records)
        if version == previous and previous != current:
            _apply_undo(path, previous, specs, records)
        after = _manifest(path)
        if after["version"] != current or after.get("restoring_to") is not None:
            raise CheckpointError(f"row store {path} committed version {after['version']} while it was "
                                  "read; try again", retriable=True)
    out = {}
    for spec in specs:
        if version == 0:
            out[spec.name] = _initial(spec, np.arange(spec.rows, dtype=np.int64), initializer)
            continue
        rec = records.pop(spec.name)
        weights = np.ascontiguousarray(rec[:, :spec.dim])
        fresh = np.flatnonzero(rec[:, -1] != FLAG_MATERIALIZED)
        if fresh.size:
            weights[fresh] = _initial(spec, fresh, initializer)
        out[spec.name] = weights
    return out


def _initial(spec: RowTableSpec, rows: np.ndarray, initializer: RowInitializer) -> np.ndarray:
    init = np.asarray(initializer(spec.name, rows), dtype=np.float32)
    if init.shape != (rows.shape[0], spec.dim):
        raise ValueError(f"initializer of table {spec.name!r} returned shape {init.shape}, expected "
                         f"{(rows.shape[0], spec.dim)}")
    return init

