"""Pure parts of streams: token bucket, key partitioning, log files,
time-window filtering."""

from __future__ import annotations

import gzip
import random

import numpy as np
import pytest

from engine.errors import SourceError
from streams import logfiles
from streams.kafka_client import build_records
from streams.logfiles import LogFormat, iter_line_blocks, iter_lines, log_format
from streams.producer import TokenBucket, key_partition, line_key
from streams.records import SourceBatch
from streams.replay import file_topic, filter_time_window, read_log_file


def test_token_bucket_paces_to_the_rate():
    bucket = TokenBucket(10.0, burst=2, now_s=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.1)  # third token: owed 1 / 10 s
    assert bucket.take(0.1) == pytest.approx(0.1)  # refilled one, spent it, still one in debt
    assert bucket.take(10.0) == 0.0  # long idle: refilled to the burst only
    assert bucket.take(10.0) == 0.0
    assert bucket.take(10.0) > 0.0
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_token_bucket_long_run_rate():
    bucket = TokenBucket(100.0, burst=1)
    now = 0.0
    for _ in range(1000):
        now += bucket.take(now)
    assert now == pytest.approx(999 / 100.0)


def test_key_partition_is_stable_and_in_range():
    assert key_partition(b"user-1", 8) == key_partition(b"user-1", 8)
    assert {key_partition(str(i).encode(), 4) for i in range(100)} == {0, 1, 2, 3}


def test_line_key_json_and_tsv():
    assert line_key(b'{"user": "u1", "x": 1}', LogFormat.JSONL, "user") == b"u1"
    assert line_key(b'{"user": 17}', LogFormat.JSONL, "user") == b"17"
    assert line_key(b'{"x": 1}', LogFormat.JSONL, "user") is None
    assert line_key(b"not json", LogFormat.JSONL, "user") is None
    assert line_key(b"a\tb\tc", LogFormat.TSV, 1) == b"b"
    assert line_key(b"a", LogFormat.TSV, 3) is None


def _write(path, data: bytes):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name", ["e.jsonl", "e.jsonl.gz", "e.tsv", "e.tsv.gz"])
def test_iter_lines_counts_blank_lines_and_strips_terminators(tmp_path, name):
    path = _write(tmp_path / name, b'{"a":1}\r\n\n{"a":2}\n\n{"a":3}')
    assert list(iter_lines(path)) == [b'{"a":1}', b"", b'{"a":2}', b"", b'{"a":3}']
    assert list(iter_lines(path, skip_lines=3)) == [b"", b'{"a":3}']
    assert list(iter_lines(path, skip_lines=9)) == []


@pytest.mark.parametrize("name", ["e.jsonl", "e.tsv.gz"])
def test_line_blocks_are_the_lines_in_order_across_read_boundaries(tmp_path, name):
    """The bulk reader yields exactly ``iter_lines``' lines (blank lines, ``\\r\\n``, a
    lone ``\\r`` kept, a final line without terminator), in blocks of ``max_lines`` that
    tile the lines from ``skip_lines``, whatever the read size."""
    rng = random.Random(3)
    for trial in range(40):
        lines = [bytes(rng.choice(b'ab\r"{}') for _ in range(rng.randint(0, 9))) for _ in range(rng.randint(0, 30))]
        data = b"".join(line + rng.choice([b"\n", b"\r\n"]) for line in lines)
        if lines and trial % 2:  # no terminator after the last line
            data = data[:len(data) - (2 if data.endswith(b"\r\n") else 1)]
        path = _write(tmp_path / f"{trial}-{name}", data)
        want = list(iter_lines(path))
        for skip in (0, 2, len(want), len(want) + 1):
            for max_lines, read_bytes in ((1, 1), (4, 5), (7, 64), (100, 1 << 20)):
                blocks = list(iter_line_blocks(path, max_lines=max_lines, skip_lines=skip, read_bytes=read_bytes))
                assert [v for _, block in blocks for v in block.to_pylist()] == want[skip:]
                assert [first for first, _ in blocks] == list(range(skip, len(want), max_lines))
                assert all(len(block) == max_lines for _, block in blocks[:-1])


def test_line_blocks_refuse_a_line_longer_than_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(logfiles, "MAX_LINE_BYTES", 10)
    path = _write(tmp_path / "long.jsonl", b"short\n" + b"x" * 40 + b"\n")
    with pytest.raises(SourceError, match="line 1 is longer than 10 bytes"):
        list(iter_line_blocks(path, max_lines=8, read_bytes=4))


def test_log_format_rejects_unknown_extension(tmp_path):
    assert log_format("x.TSV.GZ") is LogFormat.TSV
    with pytest.raises(SourceError, match="unknown extension"):
        log_format(str(tmp_path / "x.parquet"))


def test_corrupt_gzip_is_a_source_error_naming_the_file(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage-garbage-garbage")
    with pytest.raises(SourceError, match="bad.jsonl.gz"):
        list(iter_lines(str(path)))
    with pytest.raises(SourceError, match="bad.jsonl.gz"):
        list(iter_line_blocks(str(path), max_lines=4))


def test_read_log_file_tiles_offsets_and_resumes(tmp_path):
    lines = [b'{"i": %d}' % i if i % 7 else b"" for i in range(23)]
    path = _write(tmp_path / "a.jsonl.gz", b"\n".join(lines) + b"\n")
    batches = list(read_log_file(path, 0, 5))
    assert [(b.start_offset, b.end_offset) for b in batches] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert all(b.topic == file_topic(path) and b.partition == 0 and b.partition_start == 0 for b in batches)
    got = [v for b in batches for v in b.records.column(2).to_pylist()]
    assert got == lines
    assert [o for b in batches for o in b.records.column(0).to_pylist()] == list(range(23))
    assert set(batches[0].records.column(1).to_pylist()) == {-1}
    resumed = list(read_log_file(path, 12, 100))
    assert [(b.start_offset, b.end_offset, b.partition_start) for b in resumed] == [(12, 23, 12)]
    assert resumed[0].records.column(2).to_pylist() == lines[12:]
    assert list(read_log_file(path, 23, 100)) == []


def test_read_log_file_refuses_a_truncated_file(tmp_path):
    path = _write(tmp_path / "a.tsv", b"1\t2\n3\t4\n")
    with pytest.raises(SourceError, match="has 2 line"):
        list(read_log_file(path, 5, 10))


def test_filter_time_window_keeps_range_and_counts():
    records = build_records([10, 11, 12, 13], [100, 250, 90, 200], [b"a", b"b", b"c", b"d"])
    batch = SourceBatch("t", 0, 10, 15, 10, records)
    kept, removed = filter_time_window(batch, 100, 250)
    assert removed == 2
    assert (kept.start_offset, kept.end_offset) == (10, 15)
    assert kept.records.column(0).to_pylist() == [10, 13]
    same, zero = filter_time_window(batch, None, None)
    assert same is batch and zero == 0
    assert np.array_equal(filter_time_window(batch, 95, None)[0].records.column(0).to_numpy(), [10, 11, 13])
