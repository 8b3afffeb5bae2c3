"""The Python API for a serving process: ``load_model(DIR)`` -> ``ExportedModel``.

``predict(events)`` runs raw events through the training transforms
(``transforms.process.process_batch``: decode, derive, validate, filter, project, hash ids,
map them with the package's mapping set) and the rebuilt model (``trainer.serving``), so
features are computed by the same code as when the model was trained. Events may be dicts
(encoded in the config's format: JSON, or TSV/CSV by ``[schema] columns``), raw payloads
(``bytes``/``str``, as a Kafka message or log line), or a ``pa.RecordBatch`` (with a binary
``value`` column: raw payloads; otherwise one column per field). The result has one click
probability per event, in order; an event the transforms reject (it would be a dead letter)
or the filter drops is NaN. Serving events need no label: ``predict`` reads none (the label
is a constant 0 to the transforms and negative downsampling is off); ``score_source_batch``
with ``labeled=True`` is training's exact view (``headrace score``).

``apply_delta(DIR)`` moves the model to a newer package: a delta (or a chain of deltas)
that follows the loaded package, or any full package. The new state is built completely
beside the old one, then swapped in by one reference assignment: a ``predict`` running
meanwhile finishes on the old state, the next one sees the new state, none sees a mix.
``apply_delta`` calls are serialised by a lock; ``predict`` takes no lock.

Example:
    >>> model = load_model("exports/pkg-00000001")                          # doctest: +SKIP
    >>> model.predict([{"i1": 3, "c1": "a9f0"}, b'{"i1": 1, "c1": "77"}'])   # doctest: +SKIP
    array([0.231, 0.052], dtype=float32)
    >>> model.apply_delta("exports/pkg-00000002")                           # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import threading
from typing import Any, Sequence

import numpy as np
import orjson
import pyarrow as pa
import torch

from engine.config import HeadraceConfig, config_from_dict
from engine.export import CONFIG_FILE, DENSE_FILE, MAPPINGS_FILE, config_hash, package_config_defaults
from storage.errors import ModelPackageError
from storage.model_package import ChainLink, PackageKind, newest_file, package_chain, read_manifest, resolve_tables
from streams.records import CSV_HEADER_KEY, RAW_SCHEMA, SourceBatch
from trainer.export import stored_array, table_views
from trainer.serving import ServingModel
from transforms.config import EventFormat
from transforms.elements import OFFSET_COLUMN, ProcessedBatch
from transforms.mappers import MappingSet
from transforms.process import TransformSpec, process_batch

__all__ = ["load_model", "ExportedModel", "ScoredBatch", "serving_transform"]

Events = Sequence[dict[str, Any] | bytes | str] | pa.RecordBatch


def serving_transform(cfg: HeadraceConfig) -> TransformSpec:
    """The training transforms for events without a label: the label becomes the constant
    0 (a derived field, so it is neither read nor required) and negative downsampling is off;
    everything else (decode, validation, filter clauses, hashing, crosses) is unchanged."""
    schema = cfg.schema
    derive = {schema.label: "0", **{k: v for k, v in schema.derive.items() if k != schema.label}}
    return TransformSpec.from_sections(dataclasses.replace(schema, derive=derive),
                                       dataclasses.replace(cfg.filter, negative_keep_rate=1.0),
                                       cfg.source.max_message_bytes)


@dataclasses.dataclass(frozen=True)
class _State:
    """Everything one package version needs to predict; never changed once built."""

    path: str
    manifest: dict[str, Any]
    config: HeadraceConfig
    model: ServingModel
    mappings: MappingSet
    training: TransformSpec
    serving: TransformSpec

    @classmethod
    def build(cls, chain: list[ChainLink], tables, mappings: MappingSet | None = None) -> "_State":
        top = chain[-1]
        with open(os.path.join(top.path, CONFIG_FILE), "rb") as fh:
            doc = json.loads(fh.read())
        if config_hash(doc) != top.manifest["config_hash"]:
            raise ModelPackageError(f"package {top.path}: {CONFIG_FILE} does not match its manifest's config hash")
        cfg = config_from_dict(package_config_defaults(doc), file=os.path.join(top.path, CONFIG_FILE))
        if any(MAPPINGS_FILE in link.manifest["files"] for link in chain) or mappings is None:
            with open(newest_file(chain, MAPPINGS_FILE), "rb") as fh:
                mappings = MappingSet.from_bytes(fh.read(), where=top.path)
        dense = torch.load(os.path.join(top.path, DENSE_FILE), map_location="cpu", weights_only=True)
        model = ServingModel(cfg.train_spec(), dense, tables, top.manifest["dtype"])
        return cls(top.path, top.manifest, cfg, model, mappings, TransformSpec.from_config(cfg),
                   serving_transform(cfg))

    def tables(self) -> dict[str, dict[str, np.ndarray]]:
        """The model's tables as the package stores them (views where the dtype allows)."""
        dtype = self.manifest["dtype"]
        return {coll: {name: stored_array(view, dtype) for name, view in named.items()}
                for coll, named in table_views(self.model.model).items()}


@dataclasses.dataclass
class ScoredBatch:
    """One source batch through the transforms and the model: ``offsets`` of the scored
    events, their ``logits`` and ``predictions`` (sigmoid), ``labels`` (training view only),
    and the transforms' ``processed`` batch (dead letters, filtered offsets)."""

    offsets: np.ndarray
    logits: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray | None
    processed: ProcessedBatch


class ExportedModel:
    """A loaded package (see the module docstring)."""

    def __init__(self, state: _State):
        self._state = state
        self._apply_lock = threading.Lock()

    @property
    def path(self) -> str:
        return self._state.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self._state.manifest

    @property
    def config(self) -> HeadraceConfig:
        return self._state.config

    @property
    def serving_model(self) -> ServingModel:
        return self._state.model

    @property
    def mappings(self) -> MappingSet:
        """The id-mapping set in force."""
        return self._state.mappings

    def transform_spec(self, *, labeled: bool = False) -> TransformSpec:
        """The transforms ``predict`` (``labeled=False``) or ``score`` (``True``) run."""
        return self._state.training if labeled else self._state.serving

    def predict(self, events: Events) -> np.ndarray:
        """Click probabilities (float32) of ``events``, NaN where an event is rejected or
        filtered (see the module docstring). Thread-safe."""
        state = self._state
        sb = _source_batch(events, state.config)
        out = np.full(sb.records.num_rows, np.nan, dtype=np.float32)
        scored = _score(state, sb, state.serving)
        out[scored.offsets] = scored.predictions
        return out

    def score_source_batch(self, sb: SourceBatch, *, labeled: bool = True) -> ScoredBatch:
        """Score one raw source batch (``headrace score``): with ``labeled`` through the
        training transforms exactly (events without a label are rejected, negative
        downsampling applies), else through ``predict``'s."""
        state = self._state
        return _score(state, sb, state.training if labeled else state.serving, labeled=labeled)

    def apply_delta(self, path: str | os.PathLike[str]) -> None:
        """Move to the package at ``path`` (see the module docstring)."""
        path = os.fspath(path)
        with self._apply_lock:
            current = self._state
            if read_manifest(path)["kind"] == PackageKind.FULL.value:
                chain = package_chain(path)
                new = _State.build(chain, resolve_tables(chain))
            else:
                chain = package_chain(path, stop_at_id=current.manifest["id"])
                new = _State.build(chain, resolve_tables(chain, start=current.tables()), current.mappings)
            self._state = new


def load_model(path: str | os.PathLike[str]) -> ExportedModel:
    """Load the package at ``path`` (a full package, or a delta with its chain beside it)."""
    chain = package_chain(os.fspath(path))
    plugins = chain[-1].manifest.get("plugins")
    if plugins:
        raise ModelPackageError(
            f"package {path} was trained with [pipeline] plugins {plugins}: Beam transforms that may "
            "change the features, which predict cannot run; score the events through the pipeline "
            "(backfill into a cache) instead")
    return ExportedModel(_State.build(chain, resolve_tables(chain)))


def _score(state: _State, sb: SourceBatch, spec: TransformSpec, *, labeled: bool = False) -> ScoredBatch:
    pb = process_batch(sb, spec, state.mappings)
    rows = pb.batch
    offsets = rows.column(OFFSET_COLUMN).to_numpy(zero_copy_only=False)
    if rows.num_rows == 0:
        empty = np.zeros(0, np.float32)
        return ScoredBatch(offsets, empty, empty, empty if labeled else None, pb)
    batch = state.model.batch_of(rows, pb.mapping_version)
    logits = state.model.logits(batch)
    return ScoredBatch(offsets, logits.numpy(), torch.sigmoid(logits).numpy(),
                       batch.labels.numpy() if labeled else None, pb)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _encode(events: Sequence[Any], cfg: HeadraceConfig) -> tuple[list[bytes], bytes | None]:
    """Raw payloads of ``events`` (dicts encoded in the config's format) and, for CSV dicts
    without configured columns, the header record naming their fields."""
    schema = cfg.schema
    if all(isinstance(e, (bytes, str)) for e in events):
        return [e.encode() if isinstance(e, str) else e for e in events], None
    header = None
    columns = list(schema.columns)
    if schema.format is EventFormat.CSV and not columns:
        columns = list(dict.fromkeys(k for e in events if isinstance(e, dict) for k in e))
        header = _csv_line(columns)
    out = []
    for e in events:
        if not isinstance(e, dict):
            out.append(e.encode() if isinstance(e, str) else bytes(e))
        elif schema.format is EventFormat.JSON:
            out.append(orjson.dumps(e, option=orjson.OPT_SERIALIZE_NUMPY))
        elif schema.format is EventFormat.TSV:
            out.append("\t".join(_cell(e.get(c)) for c in columns).encode())
        else:
            out.append(_csv_line([_cell(e.get(c)) for c in columns]))
    return out, header


def _csv_line(cells: list[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue().encode()


def _source_batch(events: Events, cfg: HeadraceConfig) -> SourceBatch:
    timestamps = None
    if isinstance(events, pa.RecordBatch):
        if "value" in events.schema.names:
            if "timestamp_ms" in events.schema.names:
                timestamps = [-1 if t is None else t for t in events.column("timestamp_ms").to_pylist()]
            events = events.column("value").to_pylist()
        else:
            events = events.to_pylist()
    values, header = _encode(list(events), cfg)
    n = len(values)
    rec = pa.RecordBatch.from_arrays(
        [pa.array(np.arange(n, dtype=np.int64)), pa.array(timestamps or [-1] * n, pa.int64()),
         pa.array(values, pa.binary())], schema=RAW_SCHEMA)
    if header is not None:
        rec = rec.replace_schema_metadata({CSV_HEADER_KEY: header})
    return SourceBatch("predict", 0, 0, n, 0, rec)
