"""Derived fields and hashed feature crosses, from config alone: validation that names the
key, values through the whole chain, and the trainer seeing crosses as features."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import orjson
import pytest

from engine.config import config_from_dict
from engine.errors import ConfigError
from trainer.embedding import table_specs
from transforms.config import SchemaConfig, SparseFeature
from transforms.elements import Reason, id_column
from transforms.errors import TransformConfigError
from transforms.hashing import (
    MISSING_ID,
    hash_bytes_value,
    hash_cross,
    hash_cross_value,
    hash_int_value,
)
from transforms.mappers import MappingSet
from transforms.process import TransformSpec, output_schema, process_batch, source_batch

RATINGS = {
    "schema": {
        "label": "liked", "event_time": "ts_ms",
        "derive": {"liked": "rating >= 4", "hour_of_day": "hour % 100", "ts_ms": "ts * 1000",
                   "weekend": "day % 7 >= 5", "half": "rating / 2"},
        "dense": [{"name": "rating"}, {"name": "half"}],
        "sparse": [{"name": "movie", "rows": 1000}, {"name": "user", "type": "int", "rows": 500},
                   {"name": "hour_of_day", "type": "int", "rows": 100},
                   {"name": "movie_by_hour", "cross": ["movie", "hour_of_day"], "rows": 64}],
        "cross": [["movie", "user"]], "cross_rows": 2000,
    },
    "filter": {"where": ["weekend == 0"]},
}


def _spec(doc):
    cfg = config_from_dict(doc)
    return TransformSpec.from_config(cfg), MappingSet.default(cfg.schema), cfg


def _run(doc, events):
    spec, ms, _ = _spec(doc)
    values = [orjson.dumps(e) if isinstance(e, dict) else e for e in events]
    return process_batch(source_batch(values, timestamps_ms=[7] * len(values)), spec, ms)


def test_crosses_are_sparse_features_everywhere():
    spec, ms, cfg = _spec(RATINGS)
    names = [s.name for s in cfg.schema.sparse]
    assert names == ["movie", "user", "hour_of_day", "movie_by_hour", "movie_x_user"]
    assert [(t.name, t.rows) for t in table_specs(cfg.schema, 8)][-2:] == [("movie_by_hour", 64), ("movie_x_user", 2000)]
    schema = output_schema(spec, ms)
    assert schema.field("movie_x_user").type == schema.field(id_column("movie_x_user")).type
    assert set(ms.mappers) == set(names)
    # expansion is idempotent and the schema pickles (Beam ships it)
    again = dataclasses.replace(cfg.schema, cross_rows=2000)
    assert again.sparse == cfg.schema.sparse and hash(again) == hash(cfg.schema)
    assert pickle.loads(pickle.dumps(spec)).schema == cfg.schema


def test_derived_label_dense_sparse_time_filter_and_crosses():
    events = [
        {"rating": 5, "movie": "m1", "user": 3, "hour": 2024010112, "ts": 1.5, "day": 1},
        {"rating": 3, "movie": "m2", "user": 4, "hour": 2024010100, "ts": 2, "day": 2},
        {"rating": 4, "movie": "m1", "hour": 7, "day": 1},  # no user, no ts
        {"rating": 5, "movie": "m1", "user": 3, "hour": 1, "ts": 3, "day": 6},  # weekend: filtered
        {"movie": "m1", "user": 3, "hour": 1, "day": 1},  # no rating: no label
        {"rating": 9, "movie": "m1", "user": 3, "hour": 1, "day": 1},  # liked = 1 still: valid
    ]
    pb = _run(RATINGS, events)
    assert pb.read == 6 and pb.filtered_offsets.tolist() == [3]
    assert [(d.offset, d.reason) for d in pb.dead_letters] == [(4, Reason.MISSING_LABEL)]
    rows = pb.batch.to_pylist()
    assert [r["liked"] for r in rows] == [1.0, 0.0, 1.0, 1.0]
    assert [r["half"] for r in rows] == [2.5, 1.5, 2.0, 4.5]
    assert [r[id_column("hour_of_day")] for r in rows] == [hash_int_value(12), hash_int_value(0), hash_int_value(7),
                                                          hash_int_value(1)]
    assert [r["_event_time_ms"] for r in rows] == [1500, 2000, 7, 7]  # missing derived time -> record time
    m1, m2 = hash_bytes_value("m1"), hash_bytes_value("m2")
    assert [r[id_column("movie_x_user")] for r in rows] == [
        hash_cross_value([m1, hash_int_value(3)]), hash_cross_value([m2, hash_int_value(4)]), MISSING_ID,
        hash_cross_value([m1, hash_int_value(3)])]
    assert rows[0][id_column("movie_by_hour")] == hash_cross_value([m1, hash_int_value(12)])
    assert all(0 <= r["movie_by_hour"] < 64 and 0 <= r["movie_x_user"] < 2000 for r in rows)
    assert "rating" in pb.batch.schema.names and "hour" not in pb.batch.schema.names  # inputs projected away


def test_derived_values_that_are_no_integer_are_wrong_type_after_validation():
    doc = {"schema": {"derive": {"k": "a / b"}, "dense": [{"name": "x"}],
                      "sparse": [{"name": "k", "type": "int", "rows": 10}]}}
    pb = _run(doc, [{"label": 1, "a": 1e300, "b": 1e-300}, {"a": 1e300, "b": 1e-300}, {"label": 1, "a": 7, "b": 2},
                    {"label": 1, "a": 1, "b": 0}])
    assert [(d.offset, d.reason) for d in pb.dead_letters] == [(0, Reason.WRONG_TYPE), (1, Reason.MISSING_LABEL)]
    assert "'k' = 'a / b' is inf" in pb.dead_letters[0].detail
    assert pb.batch.column(id_column("k")).to_pylist() == [hash_int_value(3), MISSING_ID]  # 3.5 rounds down; 1/0 missing


def test_derived_fields_work_with_tsv_and_csv():
    for fmt, line in (("tsv", b"5\tm1\t2024010112"), ("csv", b'5,"m1",2024010112')):
        doc = {"schema": {"format": fmt, "columns": ["rating", "movie", "hour"], "label": "liked",
                          "derive": {"liked": "rating >= 4", "hod": "hour % 100"},
                          "sparse": [{"name": "movie", "rows": 10}, {"name": "hod", "type": "int", "rows": 24}],
                          "cross": [["movie", "hod"]]}}
        (row,) = _run(doc, [line]).batch.to_pylist()
        assert row["liked"] == 1.0 and row[id_column("hod")] == hash_int_value(12)
        assert row[id_column("movie_x_hod")] == hash_cross_value([hash_bytes_value("m1"), hash_int_value(12)])


def test_hash_cross_matches_its_reference():
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(-(1 << 63), (1 << 63) - 1, 200, dtype=np.int64) for _ in range(3))
    a[:5] = MISSING_ID
    got = hash_cross([a, b, c])
    assert got.tolist() == [hash_cross_value([int(x), int(y), int(z)]) for x, y, z in zip(a, b, c)]
    assert got[:5].tolist() == [MISSING_ID] * 5
    assert hash_cross([a, b]).tolist() != hash_cross([b, a]).tolist()  # order matters
    assert hash_cross([np.empty(0, np.int64)] * 2).shape == (0,)


@pytest.mark.parametrize("schema, words", [
    ({"derive": {"liked": "rating >="}}, "[schema] derive.liked: expression 'rating >='"),
    ({"derive": {"liked": "open('x')"}}, "no functions"),
    ({"derive": {"x2": "x2 + 1"}}, "refers to itself"),
    ({"derive": {"a": "b + 1", "b": "x"}}, "list derive.b before derive.a"),
    ({"derive": {"s": "x + 1"}, "sparse": [{"name": "s"}]}, 'type = "int"'),
    ({"derive": {"y": "s * 2"}, "sparse": [{"name": "s"}]}, "which is a string"),
    ({"derive": {"bad name": "x"}}, "derived field name"),
    ({"cross": [["s", "nope"]], "sparse": [{"name": "s"}]}, "'nope', which is not a sparse feature"),
    ({"cross": [["s"]], "sparse": [{"name": "s"}]}, "two or more different"),
    ({"cross": [["s", "m"]], "sparse": [{"name": "s"}, {"name": "m", "multi": True}]}, "multi-valued"),
    ({"cross": [["s", "t"]], "cross_rows": 0, "sparse": [{"name": "s"}, {"name": "t"}]}, "cross_rows must be >= 1"),
    ({"sparse": [{"name": "st", "cross": ["s", "t"]}, {"name": "s"}, {"name": "t"}]}, "declare crossed features first"),
    ({"format": "csv", "csv_header": False}, "needs columns"),
    ({"format": "csv", "columns": ["label"], "derive": {"y": "z * 2"}}, "columns does not list field(s) ['x', 'z']"),
])
def test_config_errors_name_the_key_and_the_fix(schema, words):
    doc = {"schema": {"dense": [{"name": "x"}], **schema}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, file="c.toml")
    assert "c.toml" in str(err.value) and words in str(err.value)


def test_filter_on_a_derived_field_is_numeric_only():
    doc = {"schema": {"dense": [{"name": "x"}], "derive": {"big": "x > 10"}}, "filter": {"where": ["big == 'yes'"]}}
    with pytest.raises(TransformConfigError, match="compare it with numbers"):
        _spec(doc)


def test_schema_built_in_python_expands_crosses():
    schema = SchemaConfig(sparse=(SparseFeature("a"), SparseFeature("b")), cross=(("a", "b"),), cross_rows=10)
    assert [(s.name, s.rows, s.cross) for s in schema.sparse][-1] == ("a_x_b", 10, ("a", "b"))
