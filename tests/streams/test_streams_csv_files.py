"""CSV log files in streams: records spanning lines, the header record, resume, produce keys."""

from __future__ import annotations

import pytest

from streams.logfiles import MAX_CSV_RECORD_LINES, LogFormat, iter_records, log_format
from streams.producer import line_key
from streams.records import csv_header_of
from streams.replay import read_log_file
from tests.streams.test_streams_pure import _write


def test_csv_extensions():
    assert log_format("a.csv") is LogFormat.CSV
    assert log_format("A.CSV.GZ") is LogFormat.CSV


@pytest.mark.parametrize("name", ["a.csv", "a.csv.gz"])
def test_quoted_line_breaks_join_lines_into_one_record(tmp_path, name):
    text = b'h1,h2\r\n1,"two\r\nlines"\r\n2,"a ""quote"", and, commas"\n\n3,"x\n\ny"\n4,z'
    path = _write(tmp_path / name, text)
    assert list(iter_records(path)) == [
        (0, 1, b"h1,h2"), (1, 3, b'1,"two\nlines"'), (3, 4, b'2,"a ""quote"", and, commas"'),
        (4, 5, b""), (5, 8, b'3,"x\n\ny"'), (8, 9, b"4,z")]
    # a resume starts at a record boundary and splits the same way
    assert list(iter_records(path, skip_lines=5)) == [(5, 8, b'3,"x\n\ny"'), (8, 9, b"4,z")]


def test_a_quote_that_never_closes_costs_one_line(tmp_path):
    lines = [b'1,"open'] + [b"%d,ok" % i for i in range(MAX_CSV_RECORD_LINES + 5)]
    path = _write(tmp_path / "a.csv", b"\n".join(lines) + b"\n")
    got = list(iter_records(path))
    assert got[0] == (0, 1, b'1,"open')
    assert [r for _, _, r in got[1:]] == lines[1:]
    assert [(a, b) for a, b, _ in got] == [(i, i + 1) for i in range(len(lines))]
    # at the end of the file too
    path = _write(tmp_path / "b.csv", b'1,ok\n2,"open\n3,ok')
    assert [r for _, _, r in iter_records(path)] == [b"1,ok", b'2,"open', b"3,ok"]


def test_only_a_quote_opening_a_field_can_span_lines(tmp_path):
    lines = [b'1,s"x,2', b'2,"a""b",c"d', b'3,"x"y', b'4,"two', b'lines",z', b'5,""', b'6,"""q"""']
    path = _write(tmp_path / "a.csv", b"\n".join(lines))
    assert [r for _, _, r in iter_records(path)] == lines[:3] + [b'4,"two\nlines",z'] + lines[5:]


def test_header_is_metadata_not_a_record_and_survives_resume(tmp_path):
    rows = [b"%d,v%d" % (i, i) for i in range(7)]
    path = _write(tmp_path / "a.csv.gz", b"label,site\n" + b"\n".join(rows) + b"\n")
    batches = list(read_log_file(path, 0, 3))
    assert [(b.start_offset, b.end_offset) for b in batches] == [(0, 4), (4, 7), (7, 8)]
    assert [v for b in batches for v in b.records.column("value").to_pylist()] == rows
    assert [o for b in batches for o in b.records.column("offset").to_pylist()] == list(range(1, 8))
    assert {csv_header_of(b.records) for b in batches} == {b"label,site"}
    resumed = list(read_log_file(path, 4, 100))
    assert [(b.start_offset, b.end_offset, b.partition_start) for b in resumed] == [(4, 8, 4)]
    assert csv_header_of(resumed[0].records) == b"label,site"
    assert resumed[0].records.column("value").to_pylist() == rows[3:]
    assert list(read_log_file(path, 8, 100)) == []
    # without a header the first line is a record
    plain = list(read_log_file(path, 0, 100, csv_header=False))
    assert plain[0].records.column("value").to_pylist()[0] == b"label,site"
    assert csv_header_of(plain[0].records) is None


def test_multi_line_records_leave_offset_gaps_inside_a_batch(tmp_path):
    path = _write(tmp_path / "a.csv", b'a,b\n1,"x\ny"\n2,z\n')
    (batch,) = read_log_file(path, 0, 10)
    assert (batch.start_offset, batch.end_offset) == (0, 4)
    assert batch.records.column("offset").to_pylist() == [1, 3]


def test_header_only_and_empty_files_yield_nothing(tmp_path):
    assert list(read_log_file(_write(tmp_path / "h.csv", b"a,b\n"), 0, 10)) == []
    assert list(read_log_file(_write(tmp_path / "e.csv", b""), 0, 10)) == []


def test_csv_line_key_reads_quoted_columns():
    assert line_key(b'1,"a,b",c', LogFormat.CSV, 1) == b"a,b"
    assert line_key(b"1,2", LogFormat.CSV, 5) is None
    assert line_key(b'1,"open', LogFormat.CSV, 0) is None
