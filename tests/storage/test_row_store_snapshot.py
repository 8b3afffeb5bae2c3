"""Read-only reads of a row store at a committed version while its writer goes on writing
(``storage.row_store_snapshot``): the current and the previous version, uncommitted writes
undone in memory only, never-written rows from the initialiser."""

from __future__ import annotations

import numpy as np
import pytest

from storage.errors import CheckpointError
from storage.row_store import RowStore, RowTableSpec
from storage.row_store_snapshot import read_weights_at

ROWS, DIM = 10, 3


def init(table: str, rows: np.ndarray) -> np.ndarray:
    return np.repeat(rows[:, None].astype(np.float32) * (-1.0 if table == "a" else -2.0), DIM, axis=1)


def write(store: RowStore, table: str, rows: list[int], value: float) -> None:
    r = np.array(rows)
    store.write(table, r, np.full((len(r), DIM), value, np.float32), np.zeros((len(r), 1), np.float32))


def expected(table: str, written: dict[int, float]) -> np.ndarray:
    out = init(table, np.arange(ROWS))
    for row, value in written.items():
        out[row] = value
    return out


def test_reads_committed_versions_while_the_writer_moves_on(tmp_path):
    store = RowStore(tmp_path, [RowTableSpec("a", ROWS, DIM, 1), RowTableSpec("b", ROWS, DIM, 1)], init, sync=False)
    write(store, "a", [1, 2], 1.0)
    v1 = store.commit()
    write(store, "a", [2, 3], 2.0)  # uncommitted: not in v1
    write(store, "b", [0], 5.0)
    got = read_weights_at(tmp_path, v1, init, store_id=store.store_id)
    np.testing.assert_array_equal(got["a"], expected("a", {1: 1.0, 2: 1.0}))
    np.testing.assert_array_equal(got["b"], expected("b", {}))
    v2 = store.commit()
    write(store, "a", [1], 3.0)
    # v1 is now the previous version, v2 the current one; the writer's files are untouched
    np.testing.assert_array_equal(read_weights_at(tmp_path, v1, init)["a"], expected("a", {1: 1.0, 2: 1.0}))
    now = read_weights_at(tmp_path, v2, init)
    np.testing.assert_array_equal(now["a"], expected("a", {1: 1.0, 2: 2.0, 3: 2.0}))
    np.testing.assert_array_equal(now["b"], expected("b", {0: 5.0}))
    np.testing.assert_array_equal(read_weights_at(tmp_path, 0, init)["a"], expected("a", {}))
    assert store.read("a", np.array([1]))[0][0, 0] == 3.0
    store.commit()
    with pytest.raises(CheckpointError, match="gone") as err:
        read_weights_at(tmp_path, v1, init)
    assert err.value.retriable
    with pytest.raises(CheckpointError, match="store"):
        read_weights_at(tmp_path, v2, init, store_id="another")
    store.close()
