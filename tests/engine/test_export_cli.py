"""``headrace export`` and ``headrace score`` through the CLI (in process), the dense program,
and serve's scheduled exports (``ExportThread``): full every N, deltas between, keep-last-N."""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import torch

from engine.cli import main
from engine.config import config_from_dict
from engine.export import ExportThread
from engine.serving import load_model
from storage.batch_cache import BatchCache
from storage.model_package import list_packages, package_chain
from streams.replay import read_log_file
from tests.engine.export_helpers import export_doc, ingest, payloads, train
from tests.engine_helpers import write_config
from trainer.checkpoint import CheckpointManager
from trainer.dense_program import load_dense_program
from trainer.embedding import collections_of
from trainer.loop import ContinuousTrainer
from trainer.metrics import ProgressiveMetrics
from transforms.process import TransformSpec, process_batch


def _cli_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0, capsys.readouterr().err[-3000:]
    return orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_export_and_score_a_log_with_a_frozen_model(tmp_path, capsys):
    # score reads the log in batches of [source] max_batch_records, the frozen trainer below
    # trains batches of the same rows: the same shapes give bitwise the same logits. Dense
    # standardisation is off: its statistics move with every trained batch, learning rate or not.
    frozen_model = {"normalize_dense": False}
    doc = export_doc(tmp_path, "a", export={"program": True}, source={"max_batch_records": 256}, model=frozen_model)
    cfg = config_from_dict(doc)
    ingest(cfg, 0, 1024)
    train(cfg)
    toml = write_config(tmp_path, doc)
    pkg = tmp_path / "pkg"
    exported = _cli_json(capsys, "export", "-c", str(toml), "--out", str(pkg), "--json")
    assert exported["kind"] == "full" and exported["program"] is True

    # the log to score, and the same events cached as backfill would cache them
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"\n".join(payloads(50_000, 600)) + b"\n")
    frozen_doc = export_doc(tmp_path, "frozen", trainer={"learning_rate": 1e-30, "batch_size": 256},
                            model={**frozen_model, "first_order_learning_rate": 1e-30})  # its own rate
    frozen = config_from_dict(frozen_doc)
    spec, mappings = TransformSpec.from_config(frozen), load_model(pkg).mappings
    with BatchCache.from_config(frozen.cache) as cache:
        for sb in read_log_file(str(log), 0, 256):
            cache.write(process_batch(sb, spec, mappings))
    # the trainer's progressive metrics on that log, with the exported model's weights and
    # learning rates too small to change them: a model that no longer trains
    trainer = ContinuousTrainer(frozen, frozen.cache.path)
    CheckpointManager(cfg.trainer.checkpoint_dir, cfg).load(trainer.model, trainer.optimizer,
                                                            ProgressiveMetrics(cfg.trainer.metrics_window))
    progressive = trainer.run()
    assert progressive["trained_samples"] == 600

    preds = tmp_path / "out" / "preds.parquet"
    scored = _cli_json(capsys, "score", "--model", str(pkg), "--from", str(log), "--out", str(preds), "--json")
    assert (scored["events"], scored["scored"], scored["dead_letters"]) == (600, 600, 0)
    assert scored["auc"] == progressive["auc"]
    assert scored["logloss"] == pytest.approx(progressive["logloss"], abs=1e-9)
    table = pq.read_table(preds)
    assert table.column_names == ["source", "offset", "label", "prediction"]
    assert table.column("offset").to_pylist() == list(range(600))
    np.testing.assert_allclose(table.column("prediction").to_numpy(), load_model(pkg).predict(payloads(50_000, 600)),
                               rtol=0, atol=1e-7)
    # unlabeled scoring: no metrics; and a config whose schema is not the model's is refused
    assert _cli_json(capsys, "score", "--model", str(pkg), "--from", str(log), "--no-labels", "--json")["auc"] is None
    other = write_config(tmp_path, {**doc, "filter": {"where": ["i1 > 0"]}}, name="other.toml")
    assert main(["score", "-c", str(other), "--model", str(pkg), "--from", str(log)]) == 2
    assert "[filter]" in capsys.readouterr().err

    # the dense program computes the model's logits from pooled embeddings
    model = load_model(pkg).serving_model
    program = load_dense_program(pkg / "dense_program.pt2")
    batch = model.batch_of(process_batch(next(read_log_file(str(log), 0, 7)), spec, mappings).batch, 0)
    with torch.no_grad():
        pooled = {p: c(batch.sparse) for p, c in collections_of(model.model).items()}
        np.testing.assert_allclose(program(batch.dense, pooled).numpy(), model.logits(batch).numpy(),
                                   rtol=0, atol=1e-6)


def test_scheduled_exports_alternate_full_and_deltas_and_keep_the_newest(tmp_path):
    cfg = config_from_dict(export_doc(tmp_path, export={"dir": str(tmp_path / "exports"), "every_s": 1.0,
                                                         "full_every": 2, "keep": 2, "program": False}))
    kinds = []
    with BatchCache.from_config(cfg.cache) as cache:
        exporter = ExportThread(cfg, cache)
        assert exporter.export_once() is None  # no checkpoint yet
        for i in range(4):
            ingest(cfg, i * 256, 256, cache)
            train(cfg)
            kinds.append(exporter.export_once()["kind"])
            assert exporter.export_once() is None  # the same checkpoint is not exported twice
    assert kinds == ["full", "delta", "full", "delta"]
    packages = list_packages(cfg.export.dir)
    assert [p.rsplit("-", 1)[1] for p in packages] == ["00000003", "00000004"]
    assert [link.manifest["kind"] for link in package_chain(packages[-1])] == ["full", "delta"]
    manifest = load_model(packages[-1]).manifest
    assert manifest["trained_samples"] == 1024 and manifest["source_offsets"] == {"t": {"0": 1024}}
