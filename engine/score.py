"""``headrace score``: score log files with an exported model through the training transforms.

Each file is read as ``backfill`` reads it (``streams.replay.read_log_file``: one partition
per file, offset = line number) and each batch goes through the package's transforms and
model (``engine.serving.ExportedModel.score_source_batch``). With labels (the default) the
events are seen exactly as training saw them (the config's filter and negative downsampling
included; an event without a label is a ``missing_label`` rejection), and the summary
carries AUC, logloss and calibration computed by the trainer's own ``ProgressiveMetrics``,
so a model that no longer trains scores a log with the AUC the trainer's progressive
metrics would report on it. ``labeled=False`` scores unlabeled logs (``predict``'s view).

``--out preds.parquet``: one row per scored event, ``source`` (the file), ``offset`` (its line),
``prediction`` and, with labels, ``label``; written atomically (``storage.atomic``).
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.backfill import expand_paths
from engine.config import HeadraceConfig
from engine.export import CONFIG_FILE, check_scoring_config
from engine.serving import ExportedModel, load_model
from storage.atomic import atomic_write
from streams.replay import read_log_file
from trainer.metrics import ProgressiveMetrics

__all__ = ["score"]

_SCHEMA_LABELED = pa.schema([("source", pa.string()), ("offset", pa.int64()), ("label", pa.float32()),
                             ("prediction", pa.float32())])
_SCHEMA = pa.schema([("source", pa.string()), ("offset", pa.int64()), ("prediction", pa.float32())])


def score(model_dir: str, paths: list[str], *, cfg: HeadraceConfig | None = None, out: str | None = None,
          labeled: bool = True) -> dict[str, Any]:
    """Score the log files ``paths`` (files, globs, directories) with the package at
    ``model_dir``; returns ``{"events", "scored", "dead_letters", "filtered", "dead_letters_by_reason",
    "auc", "logloss", "calibration", "mean_prediction", "mean_label", "out", "events_per_s"}``
    (metrics None without labels). ``cfg`` (``-c``): its schema and filter must be the model's."""
    model = load_model(model_dir)
    if cfg is not None:
        with open(os.path.join(model.path, CONFIG_FILE), "rb") as fh:
            check_scoring_config(cfg, json.loads(fh.read()), model.path)
    files = expand_paths(paths)
    run = _Run(model, labeled)
    t0 = time.perf_counter()
    if out is None:
        run.score_files(files, None)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic_write(out, lambda fh: run.score_files(files, fh))
    elapsed = max(time.perf_counter() - t0, 1e-9)
    summary = run.metrics.summary() if labeled else {}
    return {"events": run.events, "scored": run.scored, "dead_letters": sum(run.dead.values()),
            "filtered": run.filtered, "dead_letters_by_reason": dict(run.dead),
            "auc": summary.get("auc"), "logloss": summary.get("logloss"),
            "calibration": summary.get("calibration"), "mean_prediction": summary.get("mean_prediction"),
            "mean_label": summary.get("mean_label"), "out": None if out is None else os.path.abspath(out),
            "model": model.path, "events_per_s": run.events / elapsed, "elapsed_s": elapsed}


class _Run:
    def __init__(self, model: ExportedModel, labeled: bool):
        self.model = model
        self.labeled = labeled
        self.metrics = ProgressiveMetrics(model.config.trainer.metrics_window)
        self.events = self.scored = self.filtered = 0
        self.dead: collections.Counter[str] = collections.Counter()

    def score_files(self, files: list[str], fh: BinaryIO | None) -> None:
        schema = _SCHEMA_LABELED if self.labeled else _SCHEMA
        writer = pq.ParquetWriter(fh, schema) if fh is not None else None
        cfg = self.model.config
        try:
            for path in files:
                for sb in read_log_file(path, 0, cfg.source.max_batch_records, csv_header=cfg.schema.csv_header):
                    scored = self.model.score_source_batch(sb, labeled=self.labeled)
                    pb = scored.processed
                    self.events += pb.read
                    self.scored += int(scored.offsets.size)
                    self.filtered += len(pb.filtered_offsets)
                    self.dead.update(d.reason.value for d in pb.dead_letters)
                    if self.labeled:
                        self.metrics.update(scored.logits, scored.labels)
                    if writer is not None and scored.offsets.size:
                        cols = [pa.array([path] * scored.offsets.size, pa.string()),
                                pa.array(scored.offsets.astype(np.int64))]
                        if self.labeled:
                            cols.append(pa.array(scored.labels.astype(np.float32)))
                        cols.append(pa.array(scored.predictions.astype(np.float32)))
                        writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=schema))
        finally:
            if writer is not None:
                writer.close()
