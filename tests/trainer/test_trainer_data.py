"""Cached Arrow batches -> training batches: conversion, re-batching, cursor resume, prefetch."""

import dataclasses
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.errors import TrainerError
from trainer.data import BatchLayout, Cursor, Piece, TrainingStream, assemble, rebatch

LAYOUT = BatchLayout(label="label", dense=("x", "y"), sparse=("u", "m"), sparse_rows=(50, 9))


@dataclasses.dataclass(frozen=True)
class Cached:
    """The fields of storage's CachedBatch the trainer reads."""

    seq: int
    batch: pa.RecordBatch
    mapping_version: int = 0
    skipped_batches: int = 0


def make_batch(seq, n, version=0, base=0):
    """Rows numbered globally from ``base``: every value is derived from the row number, so
    a training batch can be checked against the rows it should hold."""
    r = np.arange(base, base + n)
    multi = [[int(i % 9)] * int(i % 4) for i in r]  # 0..3 values, some empty
    return Cached(seq, pa.record_batch({
        "label": pa.array((r % 2).astype(np.float32)),
        "x": pa.array(r.astype(np.float32)),
        "y": pa.array((-r).astype(np.float32)),
        "u": pa.array((r % 50).astype(np.int64)),
        "m": pa.array(multi, pa.list_(pa.int64())),
        "u.id": pa.array(r.astype(np.int64)),
        "_offset": pa.array(r.astype(np.int64)),
    }), version)


def make_stream(sizes, versions=None):
    out, base = [], 0
    for seq, n in enumerate(sizes):
        out.append(make_batch(seq, n, 0 if versions is None else versions[seq], base))
        base += n
    return out


def rows_of(item):
    return item.batch.dense[:, 0].to(torch.int64).tolist()


def check_rows(item):
    """Every tensor of the item agrees with the row numbers in its x column."""
    r = np.array(rows_of(item))
    b = item.batch
    np.testing.assert_array_equal(b.labels.numpy(), (r % 2).astype(np.float32))
    np.testing.assert_array_equal(b.dense[:, 1].numpy(), -r.astype(np.float32))
    u = b.sparse["u"]
    np.testing.assert_array_equal(u.values.numpy(), r % 50)
    np.testing.assert_array_equal(u.offsets.numpy(), np.arange(len(r) + 1))
    m = b.sparse["m"]
    counts = r % 4
    np.testing.assert_array_equal(m.offsets.numpy(), np.concatenate([[0], np.cumsum(counts)]))
    np.testing.assert_array_equal(m.values.numpy(), np.repeat(r % 9, counts))


def test_rebatch_fixed_size_in_order_and_exact_rows():
    stream = make_stream([5, 0, 7, 3, 11, 1])
    items = list(rebatch(stream, LAYOUT, 4))
    assert [i.batch.batch_size for i in items] == [4, 4, 4, 4, 4, 4, 3]
    assert sum((rows_of(i) for i in items), []) == list(range(27))
    for i in items:
        check_rows(i)
    assert items[1].first_seq == 0 and items[1].last_seq == 2
    assert items[-1].cursor == Cursor(5, 1)


def test_version_change_ends_batch_early():
    stream = make_stream([3, 3, 3, 3], versions=[0, 0, 1, 1])
    items = list(rebatch(stream, LAYOUT, 4))
    assert [(i.batch.batch_size, i.mapping_version) for i in items] == [(4, 0), (2, 0), (4, 1), (2, 1)]
    assert items[1].cursor == Cursor(1, 3)
    for i in items:
        check_rows(i)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 8])
def test_resume_at_any_cursor_equals_uninterrupted(batch_size):
    stream = make_stream([5, 2, 0, 9, 4, 6], versions=[0, 0, 0, 1, 1, 2])
    full = list(rebatch(stream, LAYOUT, batch_size))
    for k in range(len(full)):
        resumed = list(rebatch(stream, LAYOUT, batch_size, start=full[k].cursor))
        assert [rows_of(i) for i in resumed] == [rows_of(i) for i in full[k + 1:]]
        assert [i.cursor for i in resumed] == [i.cursor for i in full[k + 1:]]


def test_partial_tail_dropped_when_not_flushing():
    stream = make_stream([3, 3])
    items = list(rebatch(stream, LAYOUT, 4, flush_at_end=lambda: False))
    assert [i.batch.batch_size for i in items] == [4]
    rest = list(rebatch(stream, LAYOUT, 4, start=items[0].cursor))
    assert rows_of(rest[0]) == [4, 5]


def test_sliced_list_column_offsets_respected():
    whole = make_batch(0, 10)
    sliced = Cached(0, whole.batch.slice(3, 5))
    tb = assemble([Piece(sliced, 1, 4)], LAYOUT)
    assert tb.dense[:, 0].tolist() == [4.0, 5.0, 6.0]
    np.testing.assert_array_equal(tb.sparse["m"].values.numpy(), np.repeat([4, 5, 6], [0, 1, 2]))


def test_bad_columns_raise_trainer_errors():
    good = make_batch(7, 4)
    with pytest.raises(TrainerError, match="seq 7 .*no column 'x'"):
        assemble([Piece(Cached(7, good.batch.drop_columns(["x"])), 0, 4)], LAYOUT)
    nulls = good.batch.set_column(1, "x", pa.array([1.0, None, 2.0, 3.0], pa.float32()))
    with pytest.raises(TrainerError, match="'x' has 1 nulls"):
        assemble([Piece(Cached(7, nulls), 0, 4)], LAYOUT)
    out_of_range = good.batch.set_column(3, "u", pa.array([0, 1, 50, 2], pa.int64()))
    with pytest.raises(TrainerError, match="feature 'u' has row 50 outside its table of 50 rows"):
        assemble([Piece(Cached(7, out_of_range), 0, 4)], LAYOUT)
    with pytest.raises(TrainerError, match="out of order"):
        list(rebatch([make_batch(2, 3), make_batch(1, 3)], LAYOUT, 2))


def test_skipped_batches_are_reported():
    a, b = make_batch(0, 2), make_batch(5, 2)
    b = dataclasses.replace(b, skipped_batches=4)
    items = list(rebatch([a, b], LAYOUT, 4))
    assert sum(i.skipped_batches for i in items) == 4


@pytest.mark.parametrize("prefetch", [0, 3])
def test_training_stream_matches_rebatch_and_tracks_cursor(prefetch):
    stream = make_stream([5, 7, 2, 9])
    opened = []

    def open_batches(start_seq, stop):
        opened.append(start_seq)
        return iter([c for c in stream if c.seq >= start_seq])

    ts = TrainingStream(open_batches, LAYOUT, 4, start=Cursor(1, 2), prefetch_batches=prefetch)
    got = []
    for item in ts:
        got.append(rows_of(item))
        assert ts.cursor == item.cursor
    want = [rows_of(i) for i in rebatch(stream, LAYOUT, 4, start=Cursor(1, 2))]
    assert got == want and opened == [1]
    assert ts.state_dict() == {"seq": 3, "row": 9}


def test_training_stream_reraises_the_original_error():
    bad = make_batch(0, 4)
    bad = Cached(0, bad.batch.set_column(3, "u", pa.array([0, 1, 99, 2], pa.int64())))
    ts = TrainingStream(lambda s, stop: iter([bad]), LAYOUT, 4, prefetch_batches=2)
    with pytest.raises(TrainerError, match="row 99"):
        list(ts)


def test_close_ends_a_waiting_follow_source():
    ready = threading.Event()

    def follow(start_seq, stop):
        yield make_batch(0, 4)
        ready.set()
        while not stop():  # a follow-mode source polling for new batches
            time.sleep(0.005)

    ts = TrainingStream(follow, LAYOUT, 4, prefetch_batches=2)
    it = iter(ts)
    assert rows_of(next(it)) == [0, 1, 2, 3]
    assert ready.wait(10)
    done = threading.Event()
    results = []

    def consume():
        results.append(next(it, None))
        done.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    ts.close()
    assert done.wait(10), "the stream did not end after close()"
    assert results == [None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches():
    items = list(rebatch(make_stream([6]), LAYOUT, 4, pin_memory=True))
    assert items[0].batch.dense.is_pinned() and items[0].batch.sparse["m"].values.is_pinned()
