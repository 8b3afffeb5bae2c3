"""RowStore: lazy rows, versions, undo-log recovery and restore, on real files in tmp_path."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engine.errors import CheckpointError
from storage.row_store import RowStore, RowTableSpec
from storage.row_store_format import MANIFEST_NAME, undo_file_name

SPEC = RowTableSpec("t", rows=5000, dim=4, state_dim=1)


def init(table: str, rows: np.ndarray) -> np.ndarray:
    return (rows[:, None] * 10 + np.arange(4)[None, :]).astype(np.float32)


def open_store(path, sync=False) -> RowStore:
    return RowStore(path, [SPEC, RowTableSpec("u", 10, 4, 1)], init, sync=sync)


def put(store: RowStore, rows, value: float) -> None:
    rows = np.asarray(rows)
    store.write("t", rows, np.full((len(rows), 4), value, np.float32), np.full((len(rows), 1), value, np.float32))


def weights(store: RowStore, rows) -> np.ndarray:
    return store.read("t", np.asarray(rows))[0]


def test_never_written_rows_come_from_the_initializer_and_take_no_disk(tmp_path):
    store = open_store(tmp_path)
    w, s = store.read("t", np.array([7, 4999, 7]))
    np.testing.assert_array_equal(w, init("t", np.array([7, 4999, 7])))
    np.testing.assert_array_equal(s, np.zeros((3, 1)))
    assert store.disk_bytes("t") == 0  # reading never materialises a row
    put(store, [3], 1.0)
    store.commit()
    assert 0 < store.disk_bytes("t") <= 8192  # one page, not the 120 kB table


def test_writes_are_read_back_and_survive_reopen_after_commit(tmp_path):
    store = open_store(tmp_path)
    put(store, [1, 2], 5.0)
    assert store.commit() == 1
    store.close()
    store = open_store(tmp_path)
    assert store.version == 1
    np.testing.assert_array_equal(weights(store, [1, 2, 3]), [[5.0] * 4, [5.0] * 4, init("t", np.array([3]))[0]])


def test_uncommitted_writes_are_rolled_back_on_open(tmp_path):
    store = open_store(tmp_path, sync=True)
    put(store, [1], 5.0)
    store.commit()
    put(store, [1, 2], 9.0)
    put(store, [1], 11.0)  # second write of a row in one epoch: the undo log keeps the first old value
    # no close(): as if the process died here
    reopened = open_store(tmp_path, sync=True)
    np.testing.assert_array_equal(weights(reopened, [1, 2]), [[5.0] * 4, init("t", np.array([2]))[0]])
    assert reopened.version == 1


def test_restore_previous_version_covers_a_crash_between_commit_and_checkpoint(tmp_path):
    store = open_store(tmp_path)
    put(store, [1], 1.0)
    v1 = store.commit()
    put(store, [1, 2], 2.0)
    v2 = store.commit()
    put(store, [3], 3.0)  # uncommitted, also undone
    store.restore(v1)
    assert (store.version, store.previous_version) == (v1, None)
    np.testing.assert_array_equal(weights(store, [1, 2, 3]), np.vstack([np.full(4, 1.0), init("t", np.array([2, 3]))]))
    with pytest.raises(CheckpointError, match=f"cannot restore version {v2}"):
        store.restore(v2)
    # version numbers are never reused: the next snapshot is not confused with the dropped one
    put(store, [5], 5.0)
    assert store.commit() == v2 + 1


def test_only_the_previous_version_is_kept(tmp_path):
    store = open_store(tmp_path)
    for value in (1.0, 2.0, 3.0):
        put(store, [1], value)
        store.commit()
    with pytest.raises(CheckpointError, match="cannot restore version 1"):
        store.restore(1)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("undo-")) == [undo_file_name(2)]


def test_restore_zero_wipes_every_row(tmp_path):
    store = open_store(tmp_path)
    put(store, np.arange(100), 4.0)
    store.commit()
    store.restore(0)
    assert store.version == 0 and store.disk_bytes("t") == 0
    np.testing.assert_array_equal(weights(store, [50]), init("t", np.array([50])))


def test_a_torn_undo_entry_is_ignored_and_an_interrupted_restore_is_finished(tmp_path):
    store = open_store(tmp_path)
    put(store, [1], 1.0)
    store.commit()
    put(store, [1], 2.0)
    store.commit()
    put(store, [2], 7.0)
    with open(tmp_path / undo_file_name(2), "ab") as fh:
        fh.write(b"\x01\x02\x03")  # a partial entry: its data write never happened
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["restoring_to"] = 1  # died in the middle of restore(1)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    reopened = open_store(tmp_path)
    assert reopened.version == 1
    np.testing.assert_array_equal(weights(reopened, [1, 2]), [[1.0] * 4, init("t", np.array([2]))[0]])


def test_bad_arguments_and_shape_changes_are_named(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(IndexError, match="row 5000 is outside table 't' of 5000 rows"):
        store.read("t", np.array([5000]))
    with pytest.raises(ValueError, match="rows must be unique"):
        put(store, [1, 1], 1.0)
    with pytest.raises(KeyError, match="no table 'x'"):
        store.read("x", np.array([0]))
    store.close()
    with pytest.raises(CheckpointError, match="holds tables"):
        RowStore(tmp_path, [RowTableSpec("t", 6000, 4, 1)], init, sync=False)
