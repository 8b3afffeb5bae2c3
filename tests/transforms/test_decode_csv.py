"""CSV decode: RFC 4180 quoting, header or configured columns, every bad row a reasoned
dead letter (never a crash), and the same rows as the JSON and TSV paths for the same events."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.records import CSV_HEADER_KEY
from tests.transforms.test_transforms_decode import _outcome, _setup
from transforms.decode_csv import header_columns, scan_csv_rows
from transforms.elements import Reason, Stage, id_column
from transforms.errors import TransformConfigError
from transforms.hashing import MISSING_ID, hash_bytes_value, hash_int_value
from transforms.process import process_batch, source_batch

COLUMNS = ["click", "x", "skip", "c", "n", "t"]
CSV_CFG = {
    "schema": {
        "format": "csv", "label": "click", "event_time": "t", "columns": COLUMNS,
        "dense": [{"name": "x"}], "sparse": [{"name": "c", "rows": 100}, {"name": "n", "type": "int", "rows": 10}],
    },
    "filter": {"where": ["skip != 'drop'"]},
}
BAD_CSV = [
    (b"", Reason.EMPTY_MESSAGE),
    (b"1,2,\xff,c,3,4", Reason.NOT_UTF8),
    (b'1,2,"\xc3",c,3,4', Reason.NOT_UTF8),
    (b"1,2,k,c,3", Reason.BAD_CSV_ROW),  # five fields
    (b"1,2,k,c,3,4,5", Reason.BAD_CSV_ROW),
    (b'1,2,"a,b,c,3,4', Reason.BAD_CSV_ROW),  # unbalanced quote
    (b'1,2,k,"c",3,"4', Reason.BAD_CSV_ROW),
    (b'1,2,k"k,c,3,4', Reason.BAD_CSV_ROW),  # a quote inside an unquoted field
    (b'1,2,"k"k,c,3,4', Reason.BAD_CSV_ROW),  # text after a closing quote
    (b"1,2,k,c,3,4\n1,2,k,c,3,4", Reason.BAD_CSV_ROW),  # two records in one message
    (b"1,2,k,c\r,3,4", Reason.BAD_CSV_ROW),
    (b",2,k,c,3,4", Reason.MISSING_LABEL),
    (b',abc,k,c,3,4', Reason.MISSING_LABEL),
    (b"yes,2,k,c,3,4", Reason.BAD_LABEL),
    (b"2,2,k,c,3,4", Reason.BAD_LABEL),
    (b"1,abc,k,c,3,4", Reason.WRONG_TYPE),
    (b'1,"2 ",k,c,3,4', Reason.WRONG_TYPE),
    (b"1,2,k,c,3.5,4", Reason.WRONG_TYPE),
    (b"1,nan,k,c,3,4", Reason.NON_FINITE),
    (b"1,2,k,c,3,noon", Reason.BAD_EVENT_TIME),
    (b"1,2,k,c,3,-4", Reason.BAD_EVENT_TIME),
]
GOOD_CSV = [
    b'1,2.5,k,"a,""b""",3,99\n',  # quoted comma and doubled quotes
    b'0,,k,"",,\r\n',  # empty fields (quoted or not) are missing
    b'0.5,-1,x,"\xc3\xa9",-7,5',
    b'"1","3","k","two\nlines","4","6"',  # a quoted line break
]


def _with_header(sb, header: bytes):
    return dataclasses.replace(sb, records=sb.records.replace_schema_metadata({CSV_HEADER_KEY: header}))


def test_csv_reason_codes_alone_and_mixed():
    spec, ms = _setup(CSV_CFG)
    values = [v for v, _ in BAD_CSV] + GOOD_CSV + [b"1,2,drop,c,3,4"]
    mixed = process_batch(source_batch(values, timestamps_ms=range(len(values))), spec, ms)
    assert mixed.read == len(values) == mixed.batch.num_rows + len(mixed.dead_letters) + len(mixed.filtered_offsets)
    for k, (v, reason) in enumerate(BAD_CSV):
        alone = process_batch(source_batch([v], start_offset=k, timestamps_ms=[k]), spec, ms)
        assert _outcome(alone, k) is reason, (v, alone.dead_letters)
        assert _outcome(mixed, k) is reason, v
    assert mixed.filtered_offsets.tolist() == [len(values) - 1]
    rows = mixed.batch.to_pylist()
    assert [r["click"] for r in rows] == [1.0, 0.0, 0.5, 1.0]
    assert rows[0][id_column("c")] == hash_bytes_value('a,"b"') and rows[0]["_event_time_ms"] == 99
    assert rows[1]["x"] == 0.0 and rows[1][id_column("c")] == MISSING_ID and rows[1][id_column("n")] == MISSING_ID
    assert rows[1]["_event_time_ms"] == len(BAD_CSV) + 1  # empty event time -> record timestamp
    assert rows[2][id_column("c")] == hash_bytes_value("é") and rows[2][id_column("n")] == hash_int_value(-7)
    assert rows[3][id_column("c")] == hash_bytes_value("two\nlines") and rows[3]["x"] == 3.0
    dead = {d.offset: d for d in mixed.dead_letters}
    assert dead[5].stage is Stage.DECODE and "unbalanced" in dead[5].detail and dead[5].raw == BAD_CSV[5][0]
    assert "5 comma-separated fields; the columns name 6" in dead[3].detail


def test_header_names_the_columns_in_any_order_and_missing_columns_are_missing():
    cfg = dict(CSV_CFG, schema=dict(CSV_CFG["schema"], columns=[]))
    spec, ms = _setup(cfg)
    sb = _with_header(source_batch([b"k,3,1,ab,,2.5", b"k,4,0,cd,9"]), b"\xef\xbb\xbfskip,n,click,c,zzz,x")
    pb = process_batch(sb, spec, ms)
    assert [d.reason for d in pb.dead_letters] == [Reason.BAD_CSV_ROW]  # 5 fields for 6 header columns
    (row,) = pb.batch.to_pylist()
    assert row["click"] == 1.0 and row["x"] == 2.5 and row[id_column("c")] == hash_bytes_value("ab")
    assert row[id_column("n")] == hash_int_value(3)
    assert row["_event_time_ms"] == -1  # the header has no "t": missing in every record
    # the header's first column of a name wins; a header with a bad quote dead-letters every record
    assert header_columns(b'a,"b ""q""",a') == ("a", 'b "q"', "a")
    pb = process_batch(_with_header(source_batch([b"1,2", b"0,3"]), b'click,"x'), spec, ms)
    assert [d.reason for d in pb.dead_letters] == [Reason.BAD_CSV_ROW] * 2
    assert "header record is not valid CSV" in pb.dead_letters[0].detail


def test_records_without_header_or_columns_are_a_config_error_naming_the_fix():
    cfg = dict(CSV_CFG, schema=dict(CSV_CFG["schema"], columns=[]))
    spec, ms = _setup(cfg)
    with pytest.raises(TransformConfigError, match=r"set \[schema\] columns"):
        process_batch(source_batch([b"1,2,k,c,3,4"]), spec, ms)


def test_scan_counts_fields_and_flags_quotes():
    rows = [b"a,b,c", b'"a,b",c', b'"a""b",c', b'"a\nb"', b'a"b', b'"a"b', b'"open', b"a\nb", b""]
    data = np.frombuffer(b"".join(rows), dtype=np.uint8)
    bounds = np.cumsum([0] + [len(r) for r in rows])
    fields, flags = scan_csv_rows(data, bounds[:-1].astype(np.int64), bounds[1:].astype(np.int64))
    assert fields.tolist() == [3, 2, 2, 1, 1, 1, 1, 1, 1]
    assert flags.tolist() == [0, 0, 0, 16, 4, 4, 8, 1, 0]


_EVENTS = st.lists(st.fixed_dictionaries({
    "click": st.sampled_from([0, 1]),
    "x": st.one_of(st.none(), st.integers(-1000, 1000)),
    "c": st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)),
    "n": st.one_of(st.none(), st.integers(-(1 << 40), 1 << 40)),
}), min_size=1, max_size=30)


def _csv_field(v) -> bytes:
    if v is None:
        return b""
    s = str(v).encode()
    return b'"' + s.replace(b'"', b'""') + b'"' if any(ch in s for ch in b',"\n\r') else s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_EVENTS)
def test_csv_gives_the_json_paths_rows(events):
    """Random events, quoted where RFC 4180 needs it, give the JSON path's rows."""
    base = {"label": "click", "dense": [{"name": "x"}],
            "sparse": [{"name": "c", "rows": 100}, {"name": "n", "type": "int", "rows": 10}]}
    cols = ["click", "x", "c", "n"]
    json_spec, ms = _setup({"schema": base})
    csv_spec, _ = _setup({"schema": dict(base, format="csv", columns=cols)})
    json_pb = process_batch(source_batch([orjson.dumps({k: v for k, v in e.items() if v is not None}) for e in events]),
                            json_spec, ms)
    csv_pb = process_batch(source_batch([b",".join(_csv_field(e[c]) for c in cols) for e in events]), csv_spec, ms)
    assert not json_pb.dead_letters and not csv_pb.dead_letters, csv_pb.dead_letters
    assert csv_pb.batch.equals(json_pb.batch)
