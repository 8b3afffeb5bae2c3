"""Builders for the export tests (no tests here): a small synthetic config, ingest through the
real transforms into a real batch cache, training with the real trainer, and the trainer's
own predictions from its checkpoint (the reference an exported package must match)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from engine.config import HeadraceConfig, config_from_dict
from engine.fit_hash import mapping_store
from storage.batch_cache import BatchCache
from streams.synthetic import SyntheticSpec, generate_payloads, synthetic_config_dict
from trainer.data import BatchLayout, Piece, assemble
from trainer.loop import ContinuousTrainer
from transforms.process import TransformSpec, process_batch, source_batch

__all__ = ["SPEC", "export_config", "export_doc", "payloads", "ingest", "train", "trainer_predictions"]

SPEC = SyntheticSpec(num_dense=2, num_sparse=3, cardinality=400, informative_sparse=2, informative_dense=1,
                     seed=11)
_CHUNK = 256


def export_config(tmp_path: Path, name: str = "m", **sections) -> HeadraceConfig:
    return config_from_dict(export_doc(tmp_path, name, **sections))


def export_doc(tmp_path: Path, name: str = "m", **sections) -> dict:
    """A small config document: 3 sparse features of 64 rows, dim 4, a DLRM with its
    first-order part, the cache and checkpoints under ``tmp_path/name``."""
    doc = synthetic_config_dict(SPEC, rows=64, embedding_dim=4)
    doc["cache"] = {"path": str(tmp_path / name / "cache")}
    doc["trainer"].update({"checkpoint_dir": str(tmp_path / name / "ckpt"), "batch_size": 128,
                           "bottom_mlp": [8, 4], "top_mlp": [8], "checkpoint_every_batches": 1000,
                           "metrics_window": 2000, "device": "cpu", "learning_rate": 0.1})
    doc["export"] = {"program": False}
    for section, body in sections.items():
        doc.setdefault(section, {}).update(body)
    return doc


def payloads(start: int, n: int) -> list[bytes]:
    return generate_payloads(SPEC, n, start)


def ingest(cfg: HeadraceConfig, start: int, n: int, cache: BatchCache | None = None) -> None:
    """Events ``start .. start + n - 1`` through the transforms into the cache (the newest
    stored mapping set, as the pipeline uses)."""
    spec = TransformSpec.from_config(cfg)
    mappings = mapping_store(cfg).load_or_default(cfg.schema, cfg.hash.mapper)
    own = cache is None
    cache = cache or BatchCache.from_config(cfg.cache)
    try:
        for lo in range(start, start + n, _CHUNK):
            hi = min(lo + _CHUNK, start + n)
            cache.write(process_batch(source_batch(payloads(lo, hi - lo), start_offset=lo), spec, mappings))
    finally:
        if own:
            cache.close()


def train(cfg: HeadraceConfig, **kwargs) -> dict:
    return ContinuousTrainer(cfg, cfg.cache.path, **kwargs).run()


class _Cached:
    def __init__(self, batch: pa.RecordBatch, version: int):
        self.batch, self.mapping_version, self.seq = batch, version, 0


def trainer_predictions(cfg: HeadraceConfig, events: list[bytes]) -> np.ndarray:
    """Click probabilities of ``events`` by the trainer's own model restored from its newest
    checkpoint (its own placement: fused, row-cached, ...), features from the training
    transforms with the mapping set the model was trained under."""
    trainer = ContinuousTrainer(cfg, cfg.cache.path, device="cpu")
    loaded = trainer.checkpoints.load(trainer.model, trainer.optimizer, trainer.metrics)
    version = int(loaded.counters.get("mapping_version") or 0)
    mappings = mapping_store(cfg).load_or_default(cfg.schema, cfg.hash.mapper, version=version)
    pb = process_batch(source_batch(events), TransformSpec.from_config(cfg), mappings)
    trainer.model.eval()
    out = []
    step = cfg.trainer.batch_size  # what one training step looks up (a row cache holds that much)
    for lo in range(0, pb.batch.num_rows, step):
        rows = pb.batch.slice(lo, step)
        batch = assemble([Piece(_Cached(rows, version), 0, rows.num_rows)], BatchLayout.from_config(cfg))
        with torch.no_grad():
            out.append(torch.sigmoid(trainer.model(batch.dense, batch.sparse)).numpy())
    for collection in trainer.collections:
        close = getattr(collection, "close", None)
        if close is not None:
            close()
    return np.concatenate(out)
