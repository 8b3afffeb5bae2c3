"""Id mappers: modulo/double kernels vs Python, byte format, registry, MappingSet bytes
(files: tests/storage/test_storage_mapping_store.py)."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import SchemaConfig, SparseFeature
from engine.errors import MappingError
from transforms.hashing import MISSING_ID
from transforms.mappers import (
    DoubleHashMapper,
    IdMapper,
    MappingSet,
    ModuloMapper,
    load_mapper,
    make_mapper,
    register_mapper,
    registered_mappers,
)

I64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(I64, max_size=50), st.integers(1, 1 << 40))
def test_modulo_treats_ids_as_unsigned(ids, rows):
    m = ModuloMapper(rows)
    got = m.map(np.array(ids, dtype=np.int64)).tolist()
    assert got == [(v & ((1 << 64) - 1)) % rows for v in ids]
    assert all(0 <= r < rows for r in got)


def test_double_mapper_two_rows_in_range_and_deterministic():
    m = DoubleHashMapper(97, seed=7)
    ids = np.array([MISSING_ID, -1, 5, 1 << 62, -(1 << 63)], dtype=np.int64)
    rows = m.map(ids)
    assert rows.shape == (2, 5) and rows.dtype == np.int64
    assert ((rows >= 0) & (rows < 97)).all()
    # two half-size ranges: [0, 48) and [48, 97)
    assert rows[0].tolist() == [(v & ((1 << 64) - 1)) % 48 for v in ids.tolist()]
    assert ((rows[1] >= 48) & (rows[1] < 97)).all()
    assert np.array_equal(rows, DoubleHashMapper(97, seed=7).map(ids))
    assert not np.array_equal(rows[1], DoubleHashMapper(97, seed=8).map(ids)[1])


def test_double_mapper_needs_two_rows():
    with pytest.raises(MappingError, match="rows >= 2"):
        DoubleHashMapper(1)


def test_map_rejects_wrong_dtype():
    with pytest.raises(MappingError, match="int64"):
        ModuloMapper(10).map(np.array([1.0]))


@pytest.mark.parametrize("mapper", [ModuloMapper(1000), DoubleHashMapper(33, seed=123)])
def test_bytes_round_trip(mapper):
    blob = mapper.to_bytes()
    back = load_mapper(blob)
    assert type(back) is type(mapper) and back.rows == mapper.rows and back == mapper
    ids = np.arange(-50, 50, dtype=np.int64)
    assert np.array_equal(back.map(ids), mapper.map(ids))
    assert IdMapper.from_bytes(blob) == mapper


def test_corrupt_blobs_are_named():
    register_mapper("test-table", _TableMapper)
    blob = DoubleHashMapper(10).to_bytes()
    with pytest.raises(MappingError, match="magic"):
        load_mapper(b"XXXXXXXX" + blob[8:])
    with pytest.raises(MappingError, match="truncated"):
        load_mapper(blob[:10])
    with pytest.raises(MappingError, match="corrupt header"):
        load_mapper(blob[:20])
    with pytest.raises(MappingError, match="truncated"):
        load_mapper(_TableMapper(5, keys=[1], values=[2]).to_bytes()[:-3])


class _TableMapper(IdMapper):
    """A small real mapper with array state: explicit id -> row table, modulo fallback."""

    name = "test-table"
    version = 2

    def __init__(self, rows, *, keys=(), values=()):
        super().__init__(rows)
        self.keys = np.asarray(keys, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.int64)

    def map(self, ids):
        ids = self.check_ids(ids)
        out = ModuloMapper(self.rows).map(ids)
        idx = np.searchsorted(self.keys, ids)
        hit = (idx < len(self.keys)) & (self.keys[np.minimum(idx, len(self.keys) - 1)] == ids) if len(self.keys) else \
            np.zeros(len(ids), bool)
        out[hit] = self.values[idx[hit]]
        return out

    def state(self):
        return {"note": "sorted keys"}, {"keys": self.keys, "values": self.values}

    @classmethod
    def from_state(cls, rows, params, arrays, version):
        return cls(rows, keys=arrays["keys"], values=arrays["values"])


def test_registry_custom_mapper_round_trip_and_errors():
    register_mapper("test-table", _TableMapper)
    register_mapper("test-table", _TableMapper)  # idempotent
    assert "test-table" in registered_mappers() and "modulo" in registered_mappers()
    m = make_mapper("test-table", 50, keys=[3, 9], values=[7, 8])
    assert m.map(np.array([3, 9, 4], dtype=np.int64)).tolist() == [7, 8, 4]
    back = load_mapper(m.to_bytes())
    assert np.array_equal(back.keys, m.keys) and back == m
    # checksum catches a flipped array byte
    blob = bytearray(m.to_bytes())
    blob[-1] ^= 0xFF
    with pytest.raises(MappingError, match="checksum"):
        load_mapper(bytes(blob))
    # a newer format version than the code is refused
    newer = m.to_bytes().replace(b'"version": 2', b'"version": 9')
    with pytest.raises(MappingError, match="format version 9"):
        load_mapper(newer)
    with pytest.raises(MappingError, match="unknown id mapper 'nope'"):
        make_mapper("nope", 10)
    with pytest.raises(MappingError, match="bad parameters"):
        make_mapper("modulo", 10, k=3)
    with pytest.raises(MappingError, match="already registered"):
        register_mapper("modulo", _TableMapper.__class__("Other", (ModuloMapper,), {"name": "modulo"}))
    with pytest.raises(MappingError, match="name attribute"):
        register_mapper("other-name", _TableMapper)
    with pytest.raises(MappingError, match="rows"):
        ModuloMapper(0)


def _schema(rows=(10, 20)):
    return SchemaConfig(sparse=tuple(SparseFeature(f"c{i}", rows=r) for i, r in enumerate(rows)))


def test_mapping_set_bytes_round_trip():
    schema = _schema()
    v0 = MappingSet.default(schema)
    assert v0.version == 0 and v0["c1"].rows == 20 and isinstance(v0["c0"], ModuloMapper)
    v1 = MappingSet(1, {"c0": DoubleHashMapper(10), "c1": ModuloMapper(20)})
    assert MappingSet.from_bytes(v1.to_bytes()) == v1 and MappingSet.from_bytes(v0.to_bytes()) == v0
    assert pickle.loads(pickle.dumps(v1)) == v1
    with pytest.raises(MappingError, match="f.hrms: not a mapping set"):
        MappingSet.from_bytes(b"garbage", where="f.hrms")


def test_mapping_set_checks_schema():
    ms = MappingSet(3, {"c0": ModuloMapper(10)})
    with pytest.raises(MappingError, match="no mapper for feature 'c1'"):
        ms.check_schema(_schema())
    with pytest.raises(MappingError, match="rows = 20"):
        MappingSet(3, {"c0": ModuloMapper(10), "c1": ModuloMapper(21)}).check_schema(_schema())
    with pytest.raises(MappingError, match="version"):
        MappingSet(-1, {})
