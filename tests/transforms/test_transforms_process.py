"""process_batch: fixed output schema, second schema (multi int + double hashing), filters,
accounting on random mixes of good and bad events."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import config_from_dict
from streams.synthetic import BAD_PAYLOADS, SyntheticSpec, generate_payloads, synthetic_config_dict
from transforms.elements import Reason, id_column
from transforms.errors import MappingError, TransformConfigError
from transforms.hashing import hash_int_value
from transforms.mappers import DoubleHashMapper, MappingSet, ModuloMapper
from transforms.process import TransformSpec, bench_process, output_schema, process_batch, source_batch

SECOND = {  # non-Criteo names and counts, a multi-valued int feature
    "schema": {
        "label": "clicked",
        "dense": [{"name": "price"}],
        "sparse": [{"name": "user", "type": "int", "rows": 64},
                   {"name": "history", "type": "int", "multi": True, "max_values": 4, "rows": 32},
                   {"name": "country", "rows": 8}],
    },
    "filter": {"where": ["kind in ['click', 'view']", "price >= 0", "country present"]},
}


def _spec(d):
    cfg = config_from_dict(d)
    return cfg, TransformSpec.from_config(cfg)


def _u(v):
    return v % (1 << 64)


def test_second_schema_with_double_hashing_and_filter():
    cfg, spec = _spec(SECOND)
    ms = MappingSet(4, {"user": ModuloMapper(64), "history": DoubleHashMapper(32), "country": DoubleHashMapper(8)})
    events = [
        b'{"clicked": 1, "price": 2, "user": 5, "history": [1, 2], "country": "FR", "kind": "click"}',
        b'{"clicked": 0, "price": 1, "user": 6, "history": [], "country": "DE", "kind": "buy"}',  # filtered
        b'{"clicked": 0, "price": -1, "user": 6, "country": "DE", "kind": "view"}',  # filtered
        b'{"clicked": 0, "price": 3, "user": 6, "kind": "view"}',  # filtered (country missing)
        b'{"clicked": 0, "price": 3, "history": [1, 2, 3, 4, 5], "country": "DE", "kind": "view"}',
        b'{"clicked": 0, "price": 3, "user": 7, "country": "DE", "kind": 5}',
    ]
    pb = process_batch(source_batch(events, start_offset=10), spec, ms)
    assert pb.mapping_version == 4
    assert pb.filtered_offsets.tolist() == [11, 12, 13]
    assert [(d.offset, d.reason) for d in pb.dead_letters] == [(14, Reason.TOO_MANY_VALUES), (15, Reason.WRONG_TYPE)]
    assert "'kind'" in pb.dead_letters[1].detail
    assert pb.batch.schema == output_schema(spec, ms)
    assert pb.batch.schema.names == ["clicked", "price", "user", "history", "country", "user.id", "history.id",
                                     "country.id", "_offset", "_event_time_ms"]
    assert pb.batch.schema.field("history").type == pa.list_(pa.int64())
    assert pb.batch.schema.field("country").type == pa.list_(pa.int64())  # lookups == 2
    assert pb.batch.schema.field("user").type == pa.int64()
    row = pb.batch.to_pylist()[0]
    hist_ids = [hash_int_value(1), hash_int_value(2)]
    assert row[id_column("history")] == hist_ids
    want = DoubleHashMapper(32).map(np.array(hist_ids, dtype=np.int64))
    assert row["history"] == [want[0, 0], want[1, 0], want[0, 1], want[1, 1]]
    assert len(row["country"]) == 2 and row["user"] == _u(hash_int_value(5)) % 64
    assert "kind" not in pb.batch.schema.names


def test_empty_and_all_bad_batches_keep_the_schema():
    cfg, spec = _spec(SECOND)
    ms = MappingSet.default(cfg.schema)
    want = output_schema(spec, ms)
    for values in ([], [b"", b"nope"], [b'{"clicked": 1, "kind": "x", "country": "a", "price": 1}']):
        pb = process_batch(source_batch(values), spec, ms)
        assert pb.batch.schema == want and pb.batch.num_rows == 0
        assert pb.read == len(values) == len(pb.dead_letters) + len(pb.filtered_offsets)


def test_filter_types_are_checked_against_the_schema():
    with pytest.raises(TransformConfigError, match="compare it with numbers"):
        _spec({**SECOND, "filter": {"where": ["user == 'x'"]}})
    with pytest.raises(TransformConfigError, match="multi-valued"):
        _spec({**SECOND, "filter": {"where": ["history == 1"]}})
    _spec({**SECOND, "filter": {"where": ["history present", "user in [1, 2]"]}})


def test_mappings_must_match_the_schema():
    cfg, spec = _spec(SECOND)
    with pytest.raises(MappingError, match="rows = 64"):
        process_batch(source_batch([]), spec, MappingSet(1, {"user": ModuloMapper(65), "history": ModuloMapper(32),
                                                            "country": ModuloMapper(8)}))


def test_spec_is_picklable():
    import pickle

    cfg, spec = _spec(SECOND)
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and back.plan == spec.plan


SYN = SyntheticSpec(num_dense=3, num_sparse=4, cardinality=50)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 10_000), st.sampled_from(BAD_PAYLOADS)), min_size=0, max_size=60),
       st.sampled_from([1.0, 0.5]))
def test_accounting_on_random_mixes(picks, keep_rate):
    d = synthetic_config_dict(SYN, rows=100)
    d["filter"] = {"negative_keep_rate": keep_rate, "where": ["i1 > 1"]}
    cfg, spec = _spec(d)
    ms = MappingSet.default(cfg.schema)
    values = [generate_payloads(SYN, 1, start=p)[0] if isinstance(p, int) else p for p in picks]
    pb = process_batch(source_batch(values, start_offset=1000), spec, ms)
    assert pb.read == len(values)
    offs = sorted(pb.batch.column("_offset").to_pylist() + [x.offset for x in pb.dead_letters]
                  + pb.filtered_offsets.tolist())
    assert offs == list(range(1000, 1000 + len(values)))  # every event exactly once
    assert pb.batch.schema == output_schema(spec, ms)
    bad = {i + 1000 for i, p in enumerate(picks) if not isinstance(p, int)}
    assert {x.offset for x in pb.dead_letters} == bad
    # the same events processed one by one are kept/filtered/dead the same way
    for k in range(0, len(values), 9):
        alone = process_batch(source_batch([values[k]], start_offset=1000 + k), spec, ms)
        assert alone.batch.num_rows == int(1000 + k in pb.batch.column("_offset").to_pylist())
        assert len(alone.filtered_offsets) == int(1000 + k in pb.filtered_offsets)


def test_bench_process_runs():
    d = synthetic_config_dict(SYN, rows=100)
    cfg, spec = _spec(d)
    eps = bench_process(generate_payloads(SYN, 300), spec, MappingSet.default(cfg.schema), repeats=1, batch_size=128)
    assert eps > 0
