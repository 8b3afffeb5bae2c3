"""storage.mapping_store: versioned mapping-set files, the newest-or-default rule, the
directory rule."""

from __future__ import annotations

import os
import pickle

import pytest

from engine.config import CacheConfig, HashConfig, SchemaConfig, SparseFeature
from engine.errors import MappingError
from storage.mapping_store import MappingStore, mappings_dir
from transforms.mappers import DoubleHashMapper, MappingSet, ModuloMapper


def _schema(rows=(10, 20)):
    return SchemaConfig(sparse=tuple(SparseFeature(f"c{i}", rows=r) for i, r in enumerate(rows)))


def test_save_load_latest(tmp_path):
    schema = _schema()
    store = MappingStore(tmp_path / "maps")
    assert store.versions() == [] and store.latest_version() is None
    with pytest.raises(MappingError, match="no mapping sets"):
        store.load()
    v0 = MappingSet.default(schema)
    store.save(v0)
    v1 = MappingSet(1, {"c0": DoubleHashMapper(10), "c1": ModuloMapper(20)})
    path = store.save(v1)
    assert path.endswith("mappings-000000000001.hrms")
    assert store.versions() == [0, 1] and store.latest_version() == 1
    assert store.load() == v1
    assert store.load(version=0) == v0
    with pytest.raises(MappingError, match="immutable"):
        store.save(v1)
    with pytest.raises(MappingError, match="not in"):
        store.load(version=5)
    (tmp_path / "maps" / "mappings-000000000002.hrms").write_bytes(b"garbage")
    with pytest.raises(MappingError, match="not a mapping set"):
        store.load()
    assert sorted(os.listdir(tmp_path / "maps")) == [f"mappings-00000000000{v}.hrms" for v in (0, 1, 2)]


def test_load_or_default_is_the_newest_set_or_version_0(tmp_path):
    schema = _schema()
    store = MappingStore(tmp_path / "none-yet")
    default = store.load_or_default(schema, "double")
    assert default == MappingSet.default(schema, "double") and default.version == 0
    assert store.load_or_default(schema, "double", version=0) == default  # 0 is the default until saved
    v2 = MappingSet(2, {"c0": ModuloMapper(10), "c1": DoubleHashMapper(20)})
    store.save(v2)
    assert store.load_or_default(schema) == v2
    assert store.load_or_default(schema, version=0) == MappingSet.default(schema)
    with pytest.raises(MappingError, match="not in"):
        store.load_or_default(schema, version=1)
    with pytest.raises(MappingError, match="rows = 21"):  # a stored set must fit the schema
        store.load_or_default(_schema((10, 21)))


def test_files_written_before_still_load(tmp_path):
    # The file is MappingSet.to_bytes() under its version's name, as MappingSet.save wrote
    # it before the store existed; a crashed writer's temporary file is not a version.
    v7 = MappingSet(7, {"c0": DoubleHashMapper(10), "c1": ModuloMapper(20)})
    (tmp_path / "mappings-000000000007.hrms").write_bytes(v7.to_bytes())
    (tmp_path / "mappings-000000000008.hrms.tmp-4242").write_bytes(b"partial")
    store = MappingStore(tmp_path)
    assert store.versions() == [7] and store.load_or_default(_schema()) == v7


def test_directory_rule_and_pickling(tmp_path):
    cache = CacheConfig(path=str(tmp_path / "cache"))
    assert mappings_dir(HashConfig(), cache) == os.path.join(cache.path, "mappings")
    assert mappings_dir(HashConfig(mappings_dir="/m"), cache) == "/m"
    store = MappingStore.from_config(HashConfig(), cache)
    assert store.directory == mappings_dir(HashConfig(), cache)
    assert pickle.loads(pickle.dumps(store)) == store  # Beam ships it to every worker


def test_prune_keeps_the_newest_and_every_needed_version(tmp_path):
    store = MappingStore(tmp_path / "maps")
    for v in range(7):
        store.save(MappingSet(v, {"c0": ModuloMapper(10), "c1": ModuloMapper(20)}))
    assert store.prune(0) == [] and store.versions() == list(range(7))  # 0 keeps everything
    assert store.prune(3, needed_from=2) == [0, 1]  # a reader still needs 2: it stays
    assert store.versions() == [2, 3, 4, 5, 6]
    assert store.prune(3) == [2, 3] and store.versions() == [4, 5, 6]
    assert store.prune(3) == [] and store.prune(10) == []
    with pytest.raises(MappingError, match="not in"):
        store.load(version=3)
