"""Model packages end to end in one process: real transforms, cache, trainer and checkpoints;
a package's predictions equal the trainer's own (full, base + deltas, a model that crossed a
mapping-version boundary, a row-cached model), deltas reproduce a full export bitwise, and a
delta swaps in atomically under concurrent readers."""

from __future__ import annotations

import json
import threading

import numpy as np
import orjson
import pyarrow as pa
import pytest
import torch

from engine.config import Interaction
from engine.export import config_hash, export_package
from engine.fit_hash import fit_from_cache, migration_hook
from engine.serving import load_model
from storage.batch_cache import BatchCache
from storage.errors import ModelPackageError
from storage.id_stats import IdStatsStore
from storage.model_package import package_chain, resolve_tables
from tests.engine.export_helpers import export_config, ingest, payloads, train, trainer_predictions

TOL = 1e-6
PROBE = payloads(100_000, 300)  # events the model never trained on


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A model exported after 1024 events (full p1), trained on 512 more and exported as a
    delta (p2) and as a full package of the same checkpoint (f2); with the trainer's own
    predictions at both checkpoints."""
    tmp = tmp_path_factory.mktemp("lineage")
    cfg = export_config(tmp)
    ingest(cfg, 0, 1024)
    train(cfg)
    p1 = export_package(cfg, str(tmp / "p1"))
    ref1 = trainer_predictions(cfg, PROBE)
    ingest(cfg, 1024, 512)
    train(cfg)
    p2 = export_package(cfg, str(tmp / "p2"), since=p1["package"])
    f2 = export_package(cfg, str(tmp / "f2"))
    ref2 = trainer_predictions(cfg, PROBE)
    return cfg, p1, p2, f2, ref1, ref2


def test_full_package_predicts_like_the_trainer(lineage):
    cfg, p1, _, _, ref1, _ = lineage
    model = load_model(p1["package"])
    got = model.predict(PROBE)
    assert got.dtype == np.float32 and got.shape == (len(PROBE),)
    np.testing.assert_allclose(got, ref1, rtol=0, atol=TOL)
    # dicts, str payloads and a RecordBatch go through the same transforms
    dicts = [orjson.loads(p) for p in PROBE[:50]]
    np.testing.assert_allclose(model.predict(dicts), ref1[:50], rtol=0, atol=TOL)
    np.testing.assert_allclose(model.predict([p.decode() for p in PROBE[:50]]), ref1[:50], rtol=0, atol=TOL)
    np.testing.assert_allclose(model.predict(pa.RecordBatch.from_pylist(dicts)), ref1[:50], rtol=0, atol=TOL)
    # both embedding collections (the DLRM's and the first-order part's) are in the package
    assert set(model.manifest["tables"]) == {"embeddings", "first_order.embeddings"}
    m = model.manifest
    assert (m["kind"], m["mapping_version"], m["trained_samples"]) == ("full", 0, 1024)
    assert m["metrics"]["auc"] is not None and m["cursor"]["seq"] > 0
    assert m["source_offsets"] == {"t": {0: 1024}} or m["source_offsets"] == {"t": {"0": 1024}}


def test_serving_needs_no_label_and_rejected_events_are_nan(lineage):
    _, p1, _, _, ref1, _ = lineage
    model = load_model(p1["package"])
    unlabeled = []
    for p in PROBE[:3]:
        event = orjson.loads(p)
        del event["label"]
        unlabeled.append(event)
    got = model.predict(unlabeled + [b"{not json", b""])
    np.testing.assert_allclose(got[:3], ref1[:3], rtol=0, atol=TOL)
    assert np.isnan(got[3:]).all()


def test_delta_chain_reproduces_the_full_export_bitwise(lineage):
    _, p1, p2, f2, _, ref2 = lineage
    assert p2["kind"] == "delta" and p2["parent"] == p1["package"]
    assert 0 < p2["rows_written"] < f2["rows_written"]
    via_chain = resolve_tables(package_chain(p2["package"]))
    full = resolve_tables(package_chain(f2["package"]))
    assert via_chain.keys() == full.keys()
    for coll in full:
        for name, rows in full[coll].items():
            assert via_chain[coll][name].dtype == rows.dtype
            assert via_chain[coll][name].tobytes() == rows.tobytes(), (coll, name)
    np.testing.assert_allclose(load_model(p2["package"]).predict(PROBE), ref2, rtol=0, atol=TOL)
    np.testing.assert_array_equal(load_model(p2["package"]).predict(PROBE), load_model(f2["package"]).predict(PROBE))


def test_apply_delta_swaps_atomically_under_readers(lineage):
    _, p1, p2, f2, ref1, ref2 = lineage
    model = load_model(p1["package"])
    before, after = model.predict(PROBE[:64]), load_model(f2["package"]).predict(PROBE[:64])
    assert not np.array_equal(before, after)
    seen: list[np.ndarray] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(model.predict(PROBE[:64]))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    model.apply_delta(p2["package"])
    stop.set()
    for t in threads:
        t.join()
    assert seen
    # every prediction came from one whole state: never a mix of old and new parameters
    assert all(np.array_equal(s, before) or np.array_equal(s, after) for s in seen)
    np.testing.assert_array_equal(model.predict(PROBE[:64]), after)
    assert model.manifest["id"] == p2["id"]
    # a delta applies only to the package it follows
    with pytest.raises(ModelPackageError, match="does not follow"):
        load_model(f2["package"]).apply_delta(p2["package"])


def test_packages_are_immutable_and_need_a_manifest(lineage, tmp_path):
    cfg, p1, _, _, _, _ = lineage
    with pytest.raises(ModelPackageError, match="exists"):
        export_package(cfg, p1["package"])
    with pytest.raises(ModelPackageError, match="not a model package"):
        load_model(tmp_path)
    manifest = json.loads(open(f"{p1['package']}/manifest.json").read())
    assert manifest["format"] == 1 and manifest["config_hash"] and manifest["model_fingerprint"]


def test_model_that_crossed_a_mapping_version_boundary(tmp_path):
    cfg = export_config(tmp_path, hash={"min_events_to_fit": 500, "hot_fraction": 0.3, "reserve_fraction": 0.05})
    with BatchCache.from_config(cfg.cache) as cache:
        IdStatsStore.attach(cache, cfg.schema, cfg.hash)
        ingest(cfg, 0, 1024, cache)
        hook = migration_hook(cfg, cache)
        train(cfg, on_mapping_change=hook)
        assert fit_from_cache(cfg, cache=cache)["version"] == 1
        ingest(cfg, 1024, 512, cache)
        train(cfg, on_mapping_change=hook)
    assert [(m["from"], m["to"]) for m in hook.reports] == [(0, 1)]
    pkg = export_package(cfg, str(tmp_path / "pkg"))
    assert pkg["mapping_version"] == 1
    np.testing.assert_allclose(load_model(pkg["package"]).predict(PROBE), trainer_predictions(cfg, PROBE),
                               rtol=0, atol=TOL)


def test_row_cached_model(tmp_path):
    # a cache smaller than the tables: rows move between the cache and the store
    cfg = export_config(tmp_path, row_cache={"enabled": True, "path": str(tmp_path / "rows"), "cache_rows": 40,
                                             "fsync": False}, trainer={"batch_size": 32})
    ingest(cfg, 0, 512)
    train(cfg)
    base = export_package(cfg, str(tmp_path / "base"))
    ingest(cfg, 512, 128)
    train(cfg)
    delta = export_package(cfg, str(tmp_path / "delta"), since=base["package"], dtype="fp32")
    ref = trainer_predictions(cfg, PROBE)
    np.testing.assert_allclose(load_model(delta["package"]).predict(PROBE), ref, rtol=0, atol=TOL)


def test_half_precision_tables(lineage, tmp_path):
    cfg, _, _, _, _, ref2 = lineage
    pkg = export_package(cfg, str(tmp_path / "bf16"), dtype="bf16")
    model = load_model(pkg["package"])
    table = resolve_tables(package_chain(pkg["package"]))["embeddings"]["c1"]
    assert table.dtype == np.int16  # bfloat16 bit patterns
    got = model.predict(PROBE)
    assert np.abs(got - ref2).max() < 0.02 and not np.array_equal(got, ref2)
    assert model.serving_model.model.embeddings.weights.dtype == torch.bfloat16


def test_a_package_from_before_the_interaction_option_serves_as_dot(tmp_path):
    """Packages written before [model] interaction store no such key: their DLRM's top MLP
    read the dots alone, and they load as "dot" (the default is now "dot_concat")."""
    cfg = export_config(tmp_path, model={"interaction": "dot"})
    ingest(cfg, 0, 512)
    train(cfg)
    pkg = export_package(cfg, str(tmp_path / "old"))["package"]
    config_path, manifest_path = tmp_path / "old" / "config.json", tmp_path / "old" / "manifest.json"
    doc = json.loads(config_path.read_text())
    del doc["model"]["interaction"]
    manifest = json.loads(manifest_path.read_text())
    manifest["config_hash"] = config_hash(doc)
    for path, body in ((config_path, doc), (manifest_path, manifest)):
        path.chmod(0o644)
        path.write_text(json.dumps(body))
    model = load_model(pkg)
    assert model.config.model.interaction is Interaction.DOT
    np.testing.assert_allclose(model.predict(PROBE), trainer_predictions(cfg, PROBE), rtol=0, atol=TOL)
