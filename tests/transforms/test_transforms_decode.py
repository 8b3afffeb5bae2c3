"""Decode + validate: every reason code, JSON fast path vs exact path, row independence."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import config_from_dict
from transforms.decode import Rejects, raw_buffers, validate
from transforms.decode_json import _decode_exact, decode_json
from transforms.elements import Reason, Stage, id_column
from transforms.hashing import MISSING_ID, hash_bytes_value, hash_int_value, hash_strings
from transforms.mappers import MappingSet
from transforms.process import TransformSpec, process_batch, source_batch

JSON_CFG = {
    "source": {"max_message_bytes": 300},
    "schema": {
        "label": "label", "event_time": "ts",
        "dense": [{"name": "x", "log1p": True, "default": -1.0}, {"name": "y", "allow_nan": True}],
        "sparse": [{"name": "c", "rows": 1000}, {"name": "n", "type": "int", "rows": 50},
                   {"name": "tags", "multi": True, "max_values": 3, "rows": 77}],
    },
}
SCALAR_CFG = {  # no multi-valued feature: the Numba fast path applies
    "source": {"max_message_bytes": 300},
    "schema": {
        "label": "label", "event_time": "ts",
        "dense": [{"name": "x", "log1p": True, "default": -1.0}, {"name": "y", "allow_nan": True}],
        "sparse": [{"name": "c", "rows": 1000}, {"name": "n", "type": "int", "rows": 50}],
    },
}


def _setup(cfg_dict):
    cfg = config_from_dict(cfg_dict)
    return TransformSpec.from_config(cfg), MappingSet.default(cfg.schema)


BAD_JSON = [
    (b"", Reason.EMPTY_MESSAGE),
    (None, Reason.EMPTY_MESSAGE),
    (b'{"label": 1, "c": "' + b"a" * 400 + b'"}', Reason.OVERSIZE),
    (b'\xff{"label": 1}', Reason.NOT_UTF8),
    (b'{"label": 1, "c": "\xc3"}', Reason.NOT_UTF8),
    (b'{"label": 1, "zzz": "\xed\xa0\x80"}', Reason.NOT_UTF8),  # a surrogate, in an ignored field
    (b'{"label": 1', Reason.MALFORMED_JSON),
    (b'{"label": 1, "x": NaN}', Reason.MALFORMED_JSON),
    (b'{"label": 1}\n{"label": 0}', Reason.MALFORMED_JSON),
    (b'{} {}', Reason.MALFORMED_JSON),
    (b'{"label": 1, "c": "a\nb"}', Reason.MALFORMED_JSON),  # raw newline inside a string
    (b'{"label": 1, "c": "\\ud800"}', Reason.MALFORMED_JSON),
    (b"   ", Reason.MALFORMED_JSON),
    (b"[1, 2]", Reason.NOT_AN_OBJECT),
    (b'"label"', Reason.NOT_AN_OBJECT),
    (b"5", Reason.NOT_AN_OBJECT),
    (b'{"x": 1}', Reason.MISSING_LABEL),
    (b'{"label": null, "x": "bad"}', Reason.MISSING_LABEL),
    (b'{"label": "1"}', Reason.BAD_LABEL),
    (b'{"label": true}', Reason.BAD_LABEL),
    (b'{"label": 1.5}', Reason.BAD_LABEL),
    (b'{"label": -0.5, "c": 5}', Reason.BAD_LABEL),
    (b'{"label": 1, "x": "3"}', Reason.WRONG_TYPE),
    (b'{"label": 1, "x": true}', Reason.WRONG_TYPE),
    (b'{"label": 1, "c": 5}', Reason.WRONG_TYPE),
    (b'{"label": 1, "c": {"a": 1}}', Reason.WRONG_TYPE),
    (b'{"label": 1, "n": 1.5}', Reason.WRONG_TYPE),
    (b'{"label": 1, "n": 9223372036854775808}', Reason.WRONG_TYPE),
    (b'{"label": 1, "n": "7"}', Reason.WRONG_TYPE),
    (b'{"label": 1, "x": 1e999}', Reason.NON_FINITE),
    (b'{"label": 1, "x": 1e39}', Reason.NON_FINITE),
    (b'{"label": 1, "x": -3.5e38}', Reason.NON_FINITE),
    (b'{"label": 1, "unread": 1e999999999}', Reason.NON_FINITE),  # orjson and Arrow refuse it anywhere
    (b'{"label": 1, "ts": -5}', Reason.BAD_EVENT_TIME),
    (b'{"label": 1, "ts": "noon"}', Reason.BAD_EVENT_TIME),
    (b'{"label": 1, "ts": 1.5e12}', Reason.BAD_EVENT_TIME),
]
BAD_MULTI = [
    (b'{"label": 1, "tags": "a"}', Reason.WRONG_TYPE),
    (b'{"label": 1, "tags": ["a", null]}', Reason.WRONG_TYPE),
    (b'{"label": 1, "tags": [1]}', Reason.WRONG_TYPE),
    (b'{"label": 1, "tags": ["a", "b", "c", "d"]}', Reason.TOO_MANY_VALUES),
    (b'{"label": 1, "tags": ["a", "b", "c", "d"], "x": 1e39}', Reason.NON_FINITE),
]
GOOD_JSON = [
    b'{"label": 1, "x": 2.5, "y": 1, "c": "ab", "n": -3, "ts": 1700000000000}',
    b'{\n  "ts": 5,\n  "c": "\xc3\xa9t\xc3\xa9",\n  "label": 0\n}',
    b'{"label": 0.25, "c": "a\\"b", "other": {"deep": [1, {"x": 2}]}, "n": null}',
    b'{"label": 0, "y": 1e39, "x": null, "x2": 1e300}',
    b'{"label": 1, "c": "first", "c": "second"}',
    b'{"label":1e0,"x":-0.0,"n":9223372036854775807,"ts":0}',
    b'{}'[:0] + b'{"label": 0, "x": 123456789.123456789, "y": 0.1}',
]


def _outcome(pb, k):
    """Per-record outcome of record k of a batch: a reason, or the output row."""
    dead = {d.offset: d for d in pb.dead_letters}
    if k in dead:
        return dead[k].reason
    offs = pb.batch.column("_offset").to_pylist()
    row = pb.batch.slice(offs.index(k), 1).to_pylist()[0]
    row.pop("_offset")
    return row


@pytest.mark.parametrize("cfg", [JSON_CFG, SCALAR_CFG], ids=["multi", "scalar"])
def test_json_reason_codes_alone_and_mixed(cfg):
    spec, ms = _setup(cfg)
    cases = BAD_JSON + (BAD_MULTI if cfg is JSON_CFG else [])
    values = [v for v, _ in cases] + GOOD_JSON
    mixed = process_batch(source_batch(values, timestamps_ms=range(len(values))), spec, ms)
    assert mixed.read == len(values) == mixed.batch.num_rows + len(mixed.dead_letters) + len(mixed.filtered_offsets)
    for k, (v, reason) in enumerate(cases):
        alone = process_batch(source_batch([v], start_offset=k, timestamps_ms=[k]), spec, ms)
        assert _outcome(alone, k) is reason, (v, alone.dead_letters)
        assert _outcome(mixed, k) is reason, (v, [d for d in mixed.dead_letters if d.offset == k])
    for j, v in enumerate(GOOD_JSON):
        k = len(cases) + j
        alone = process_batch(source_batch([v], start_offset=k, timestamps_ms=[k]), spec, ms)
        assert not alone.dead_letters, alone.dead_letters
        assert _outcome(alone, k) == _outcome(mixed, k)


def test_dead_letter_fields():
    spec, ms = _setup(JSON_CFG)
    pb = process_batch(source_batch([b'{"label": 1, "n": "7"}', None, b'{"label": 2}'], topic="ev", partition=3,
                                    start_offset=40, timestamps_ms=[11, 12, 13]), spec, ms)
    d0, d1, d2 = pb.dead_letters
    assert (d0.topic, d0.partition, d0.offset, d0.timestamp_ms) == ("ev", 3, 40, 11)
    assert d0.stage is Stage.VALIDATE and d0.reason is Reason.WRONG_TYPE
    assert "'n'" in d0.detail and "'7'" in d0.detail and d0.raw == b'{"label": 1, "n": "7"}'
    assert d1.stage is Stage.DECODE and d1.reason is Reason.EMPTY_MESSAGE and d1.raw == b""
    assert d2.reason is Reason.BAD_LABEL and "2" in d2.detail and "[0, 1]" in d2.detail


def test_good_values_decoded_exactly():
    spec, ms = _setup(JSON_CFG)
    v = [b'{"label": 1, "x": 2.5, "y": 1, "c": "ab", "n": -3, "tags": ["p", "q"], "ts": 1700000000000}',
         b'{"label": 0, "y": 1e39}']
    pb = process_batch(source_batch(v, start_offset=7, timestamps_ms=[100, 200]), spec, ms)
    r0, r1 = pb.batch.to_pylist()
    assert r0["label"] == 1.0 and r0["x"] == pytest.approx(math.log1p(2.5)) and r0["y"] == 1.0
    assert r0[id_column("c")] == hash_bytes_value("ab") and r0["c"] == (hash_bytes_value("ab") % (1 << 64)) % 1000
    assert r0[id_column("n")] == hash_int_value(-3) and r0["n"] == (hash_int_value(-3) % (1 << 64)) % 50
    assert r0[id_column("tags")] == [hash_bytes_value("p"), hash_bytes_value("q")]
    assert r0["tags"] == [(hash_bytes_value(t) % (1 << 64)) % 77 for t in "pq"]
    assert (r0["_offset"], r0["_event_time_ms"]) == (7, 1700000000000)
    # defaults, missing ids, allow_nan, event time from the record timestamp
    assert r1["x"] == pytest.approx(-math.log1p(1.0)) and r1["y"] == math.inf
    assert r1[id_column("c")] == MISSING_ID and r1["tags"] == [] and r1[id_column("tags")] == []
    assert (r1["_offset"], r1["_event_time_ms"]) == (8, 200)
    assert pb.mapping_version == 0 and pb.read == 2 and (pb.start_offset, pb.end_offset) == (7, 9)


# --- fast path vs exact path on random events -------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 64), 1 << 64), st.floats(allow_nan=False, width=64),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6),
)
FIELD_VALUES = {
    "label": st.one_of(st.sampled_from([0, 1, 0.5, 1.0, 0.0]), SCALARS),
    "x": st.one_of(st.integers(-1000, 1000), st.floats(-1e40, 1e40), st.sampled_from([1e-30, 123.456, 1e22, 1e23]), SCALARS),
    "y": st.one_of(st.floats(allow_nan=False), SCALARS),
    "c": st.one_of(st.text(max_size=8), SCALARS),
    "n": st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), SCALARS),
    "ts": st.one_of(st.integers(-10, 1 << 45), SCALARS),
    "zz": st.one_of(SCALARS, st.lists(st.integers(), max_size=2)),
}
EVENT = st.fixed_dictionaries({}, optional=FIELD_VALUES)


def _dump(ev, pretty):
    # stdlib json: writes ints beyond 64 bits and Infinity (not JSON: must be malformed_json)
    return json.dumps(ev, indent=2 if pretty else None, ensure_ascii=False).encode()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(EVENT, st.booleans()), min_size=1, max_size=25),
       st.lists(st.sampled_from([b"{", b"[]", b'{"label": 1, "x": NaN}', b'{"label":1,"c":"\\u00e9"}']), max_size=3))
def test_fast_path_agrees_with_exact_path(events, extra):
    spec, ms = _setup(SCALAR_CFG)
    values = [_dump(ev, pretty) for ev, pretty in events] + extra
    sb = source_batch(values)
    col = sb.records.column("value")
    cand = np.arange(len(values), dtype=np.int64)
    r_fast, r_exact = Rejects(), Rejects()
    fast = validate(spec.plan, decode_json(spec.plan, col, cand, r_fast), r_fast)
    offsets, data = raw_buffers(col)
    exact = validate(spec.plan, _decode_exact(spec.plan, data, cand, offsets[:-1], offsets[1:], r_exact), r_exact)
    assert {k: v[1] for k, v in r_fast.rows.items()} == {k: v[1] for k, v in r_exact.rows.items()}
    assert fast.index.tolist() == exact.index.tolist()
    for f in spec.plan.fields:
        if f.name in fast.ids:
            assert fast.ids[f.name].tolist() == hash_strings(exact.columns[f.name]).tolist()
        else:
            assert fast.columns[f.name].to_pylist() == exact.columns[f.name].to_pylist(), f.name
    # and the whole chain keeps the accounting, and each record's fate is its own
    pb = process_batch(sb, spec, ms)
    assert pb.batch.num_rows + len(pb.dead_letters) + len(pb.filtered_offsets) == len(values)
    for k in range(0, len(values), 7):
        alone = process_batch(source_batch([values[k]], start_offset=k), spec, ms)
        assert _outcome(alone, k) == _outcome(pb, k)


# --- TSV -------------------------------------------------------------------------------

TSV_CFG = {
    "schema": {
        "format": "tsv", "label": "click", "event_time": "t",
        "columns": ["click", "x", "skip", "c", "n", "t"],
        "dense": [{"name": "x"}], "sparse": [{"name": "c", "rows": 100}, {"name": "n", "type": "int", "rows": 10}],
    },
    "filter": {"where": ["skip != 'drop'"]},
}
BAD_TSV = [
    (b"", Reason.EMPTY_MESSAGE),
    (b"1\t2\t\xff\tc\t3\t4", Reason.NOT_UTF8),
    (b"1\t2\tk\tc\t3", Reason.BAD_TSV_ROW),
    (b"1\t2\tk\tc\t3\t4\t5", Reason.BAD_TSV_ROW),
    (b"1\t2\tk\tc\r\t3\t4", Reason.BAD_TSV_ROW),
    (b"\t2\tk\tc\t3\t4", Reason.MISSING_LABEL),
    (b"\tabc\tk\tc\t3\t4", Reason.MISSING_LABEL),
    (b"yes\t2\tk\tc\t3\t4", Reason.BAD_LABEL),
    (b"2\t2\tk\tc\t3\t4", Reason.BAD_LABEL),
    (b"1\tabc\tk\tc\t3\t4", Reason.WRONG_TYPE),
    (b"1\t2\tk\tc\t3.5\t4", Reason.WRONG_TYPE),
    (b"1\tnan\tk\tc\t3\t4", Reason.NON_FINITE),
    (b"1\tinf\tk\tc\t3\t4", Reason.NON_FINITE),
    (b"1\t2\tk\tc\t3\tnoon", Reason.BAD_EVENT_TIME),
    (b"1\t2\tk\tc\t3\t-4", Reason.BAD_EVENT_TIME),
]
GOOD_TSV = [b"1\t2.5\tk\tab\t3\t99\n", b"0\t\tk\t\t\t\r\n", b"0.5\t-1\tx\t\xc3\xa9\t-7\t5"]


def test_tsv_reason_codes_alone_and_mixed():
    spec, ms = _setup(TSV_CFG)
    values = [v for v, _ in BAD_TSV] + GOOD_TSV + [b"1\t2\tdrop\tc\t3\t4"]
    mixed = process_batch(source_batch(values, timestamps_ms=range(len(values))), spec, ms)
    for k, (v, reason) in enumerate(BAD_TSV):
        alone = process_batch(source_batch([v], start_offset=k, timestamps_ms=[k]), spec, ms)
        assert _outcome(alone, k) is reason, (v, alone.dead_letters)
        assert _outcome(mixed, k) is reason, v
    assert mixed.filtered_offsets.tolist() == [len(values) - 1]
    rows = mixed.batch.to_pylist()
    assert [r["click"] for r in rows] == [1.0, 0.0, 0.5]
    assert rows[0]["x"] == 2.5 and rows[0][id_column("c")] == hash_bytes_value("ab") and rows[0]["_event_time_ms"] == 99
    assert rows[1]["x"] == 0.0 and rows[1][id_column("c")] == MISSING_ID and rows[1][id_column("n")] == MISSING_ID
    assert rows[1]["_event_time_ms"] == len(BAD_TSV) + 1  # empty event time -> record timestamp
    assert rows[2][id_column("c")] == hash_bytes_value("é") and rows[2][id_column("n")] == hash_int_value(-7)
    assert "skip" not in mixed.batch.schema.names


def test_fast_path_key_guessing_with_prefix_names():
    cfg = config_from_dict({"schema": {"dense": [{"name": "i"}, {"name": "i1"}, {"name": "i10"}],
                                       "sparse": [{"name": "c", "rows": 10}, {"name": "cc", "rows": 10}]}})
    spec = TransformSpec.from_config(cfg)
    rng = np.random.default_rng(5)
    keys = ["label", "i", "i1", "i10", "i100", "c", "cc", "ccc", "c "]
    values = []
    for r in range(200):
        order = list(keys) if r % 3 else list(rng.permutation(keys))
        ev = {k: (int(r % 2) if k == "label" else (f"v{r}" if k.startswith("c") else r * 0.5)) for k in order}
        values.append(json.dumps(ev).encode())
    col = source_batch(values).records.column("value")
    cand = np.arange(len(values), dtype=np.int64)
    r_fast, r_exact = Rejects(), Rejects()
    fast = decode_json(spec.plan, col, cand, r_fast)
    offsets, data = raw_buffers(col)
    exact = _decode_exact(spec.plan, data, cand, offsets[:-1], offsets[1:], r_exact)
    assert not r_fast.rows and not r_exact.rows and len(fast.index) == 200
    for name in ("i", "i1", "i10", "label"):
        assert fast.columns[name].to_pylist() == exact.columns[name].to_pylist()
    for name in ("c", "cc"):
        assert fast.ids[name].tolist() == hash_strings(exact.columns[name]).tolist()
