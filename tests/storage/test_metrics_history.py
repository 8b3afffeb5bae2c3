"""The metrics history file: append-only JSON lines, a torn last line skipped and cut, the size
bound kept by thinning the oldest records first."""

from __future__ import annotations

import os

import pytest

from storage.errors import HistoryError
from storage.metrics_history import (
    COMPACT_FRACTION,
    MIN_MAX_BYTES,
    MetricsHistory,
    read_history,
    thin_oldest,
)


def _rec(i: int) -> dict:
    return {"unix_s": 1_700_000_000.0 + i, "samples": 128 * i, "auc": 0.5 + i * 1e-6, "run": "r1"}


def test_records_round_trip_in_order_and_append_after_reopen(tmp_path):
    path = tmp_path / "ckpt" / "h.jsonl"  # the directory is created on first append
    with MetricsHistory(path, MIN_MAX_BYTES) as h:
        for i in range(3):
            h.append(_rec(i))
    with MetricsHistory(path, MIN_MAX_BYTES) as h:
        h.append(_rec(3))
    got = read_history(path)
    assert got.records == [_rec(i) for i in range(4)] and got.skipped_lines == 0


def test_a_torn_last_line_is_skipped_with_a_count_then_cut_by_the_next_writer(tmp_path):
    path = tmp_path / "h.jsonl"
    with MetricsHistory(path, MIN_MAX_BYTES) as h:
        h.append(_rec(0))
        h.append(_rec(1))
    whole = path.read_bytes()
    with open(path, "ab") as fh:  # what a crash in the middle of a write leaves
        fh.write(b'{"unix_s": 1700000002.0, "samp')
    got = read_history(path)
    assert got.records == [_rec(0), _rec(1)] and got.skipped_lines == 1
    with MetricsHistory(path, MIN_MAX_BYTES) as h:
        h.append(_rec(2))
        assert h.torn_bytes_cut == len(b'{"unix_s": 1700000002.0, "samp')
    assert path.read_bytes().startswith(whole)
    got = read_history(path)
    assert got.records == [_rec(0), _rec(1), _rec(2)] and got.skipped_lines == 0


def test_lines_that_are_not_records_are_counted_not_fatal(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_bytes(b'{"a": 1}\n[1, 2]\nnot json\n\n{"b": 2}\n')
    got = read_history(path)
    assert got.records == [{"a": 1}, {"b": 2}] and got.skipped_lines == 2


def test_a_missing_history_is_a_history_error_naming_the_path(tmp_path):
    with pytest.raises(HistoryError, match="no metrics history at .*nothing.jsonl"):
        read_history(tmp_path / "nothing.jsonl")


def test_thinning_keeps_the_first_and_the_newest_records():
    assert thin_oldest([10] * 8, 80) == list(range(8))
    assert thin_oldest([10] * 8, 70) == [0, 2, 4, 5, 6, 7]
    assert thin_oldest([10] * 8, 45) == [0, 5, 6, 7]  # [0,2,4,5,6,7] -> [0,4,5,6,7] -> [0,5,6,7]
    assert thin_oldest([100, 1], 50) == [1]  # two left and over: the oldest goes
    assert thin_oldest([], 10) == []


def test_the_size_bound_holds_with_old_history_thinned_not_cut(tmp_path):
    path = tmp_path / "h.jsonl"
    n = 3000  # ~ 90 bytes each: about 4x the bound
    with MetricsHistory(path, MIN_MAX_BYTES) as h:
        for i in range(n):
            h.append(_rec(i))
            assert os.path.getsize(path) <= MIN_MAX_BYTES
        assert h.compactions >= 3
    kept = read_history(path).records
    assert os.path.getsize(path) <= MIN_MAX_BYTES
    assert kept[0] == _rec(0) and kept[-1] == _rec(n - 1)  # the life's start and its latest
    times = [r["unix_s"] for r in kept]
    assert times == sorted(times) and len(set(times)) == len(times)
    # Recent records are dense, old ones sampled: the newest quarter of the file has no gaps.
    newest = [int(t - 1_700_000_000) for t in times[-len(times) // 4:]]
    assert newest == list(range(newest[0], n))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) > 1  # something old was thinned
    # Thinning stops once under the compaction target: it does not throw away more than that.
    assert os.path.getsize(path) > COMPACT_FRACTION * MIN_MAX_BYTES / 2


def test_the_bound_must_leave_room_for_records(tmp_path):
    with pytest.raises(ValueError, match="max_bytes must be >= 65536"):
        MetricsHistory(tmp_path / "h.jsonl", 4096)
