"""``headrace export``: a trained model as a self-contained package, full or a delta; and the
schedule on which ``serve`` exports (``ExportThread``, ``[export]``).

A package (``storage.model_package`` writes it atomically) holds everything a serving
process needs to turn raw events into predictions with the same code as training:

==================  ===========================================================================
``config.json``     the config sections that decide features and model (schema, filter,
                    trainer, model, hash, and source's message and batch sizes; no hosts,
                    paths of stores or credentials)
``mappings.hrms``   the id-mapping set the model was trained under (full packages; a delta
                    only when the version changed)
``dense.pt``        the dense state dict (``torch.load(..., weights_only=True)``)
``dense_program.pt2``  the dense/interaction part as a ``torch.export`` program, when it exports
``tables/...``      every embedding table (full) or the rows changed since the parent (delta)
``manifest.json``   format, kind, id and parent, config hash, model fingerprint, mapping
                    version, trained samples and batches, the checkpoint's progressive
                    metrics, the cursor and the source offsets it covers, the table list
==================  ===========================================================================

A delta (``--since PACKAGE``) stores only rows that differ bitwise from the tables of the
chain it follows, plus the dense state and manifest; applying base + deltas reproduces a
full export of the same checkpoint bitwise. A delta needs the same config (hash) and table
dtype as its parent; otherwise export a full package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable

from engine.config import HeadraceConfig
from engine.config._loader import section_to_data
from engine.errors import HEADRACE_ERRORS, ConfigError
from storage.batch_cache import BatchCache
from storage.errors import ModelPackageError
from storage.mapping_store import MappingStore
from storage.model_package import (
    PackageKind,
    json_bytes,
    list_packages,
    new_package_id,
    package_chain,
    prune_packages,
    remove_stale_temps,
    resolve_tables,
    scheduled_name,
    write_package,
)
from trainer.checkpoint import latest_checkpoint, latest_sharded_checkpoint
from trainer.dense_program import PROGRAM_FILE, export_dense_program
from trainer.errors import TrainerError
from trainer.export import (
    collection_paths,
    dense_bytes,
    load_dense,
    package_tables,
    plain_model,
    snapshot_from_checkpoint,
)
from trainer.model import PRE_INTERACTION, model_fingerprint

__all__ = ["export_package", "package_config", "package_config_defaults", "config_hash", "offsets_covered",
           "ExportThread", "CONFIG_FILE", "DENSE_FILE", "MAPPINGS_FILE"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
DENSE_FILE = "dense.pt"
MAPPINGS_FILE = "mappings.hrms"
#: Sections a package leaves out: hosts, store paths, credentials, placement, schedules.
_HOST_SECTIONS = frozenset({"source", "cache", "metrics", "pipeline", "sharding", "row_cache", "export"})
#: Fields of the kept sections that name this host's paths, peers or devices: stored as
#: their defaults, so a package says nothing about the host and its hash only changes with
#: what decides features and model.
_HOST_FIELDS = {"trainer": ("checkpoint_dir", "tensorboard_dir", "feeds", "feed_token_env", "feed_tls_root_certs",
                            "device", "threads"),
                "hash": ("mappings_dir",)}


def _without_host_fields(name: str, section: Any) -> Any:
    defaults = {f.name: f.default for f in dataclasses.fields(section)
                if f.name in _HOST_FIELDS.get(name, ()) and f.default is not dataclasses.MISSING}
    return dataclasses.replace(section, **defaults) if defaults else section


def package_config(cfg: HeadraceConfig) -> dict[str, Any]:
    """The config document a package stores (``engine.config.config_from_dict`` reads it
    back): every section that decides features or model, not the host-specific ones."""
    doc = {f.name: section_to_data(_without_host_fields(f.name, getattr(cfg, f.name)))
           for f in dataclasses.fields(cfg) if f.name not in _HOST_SECTIONS}
    doc["source"] = {"max_message_bytes": cfg.source.max_message_bytes,
                     "max_batch_records": cfg.source.max_batch_records}
    return doc


def package_config_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    """A package's stored config with the keys its version predates filled in as what they
    meant then: ``[model] interaction`` was "dot" before it existed (trainer.model)."""
    model = doc.get("model")
    if isinstance(model, dict) and model.get("kind", "dlrm") == "dlrm" and "interaction" not in model:
        return {**doc, "model": {**model, "interaction": PRE_INTERACTION}}
    return doc


def config_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def offsets_covered(cache: BatchCache, cursor: dict[str, int]) -> dict[str, dict[int, int]]:
    """How far into each source partition the model at ``cursor`` has trained."""
    partitions = {(t, p) for t, parts in cache.next_offsets().items() for p in parts}
    with cache.reader() as r:
        return r.offsets_before(int(cursor["seq"]), int(cursor["row"]), partitions)


def _covered_from_config(cfg: HeadraceConfig, cursor: dict[str, int]) -> dict[str, dict[int, int]] | None:
    if not os.path.isdir(cfg.cache.path):
        return None
    with BatchCache.from_config(cfg.cache, readonly=True) as cache:
        return offsets_covered(cache, cursor)


def _parent(since: str, doc_hash: str, dtype: str) -> tuple[dict, Any, int]:
    """(parent reference, the chain's tables, the chain's mapping version) of ``since``."""
    chain = package_chain(since)
    top = chain[-1].manifest
    if top["config_hash"] != doc_hash:
        raise ModelPackageError(f"--since {since}: the package was exported with another config (hash "
                                f"{top['config_hash']}, now {doc_hash}); export a full package")
    if top["dtype"] != dtype:
        raise ModelPackageError(f"--since {since}: its tables are {top['dtype']}, this export {dtype}; "
                                "use the same --dtype or export a full package")
    ref = {"id": top["id"], "name": os.path.basename(os.path.abspath(since)), "path": os.path.abspath(since)}
    return ref, resolve_tables(chain), int(top["mapping_version"])


def export_package(cfg: HeadraceConfig, out: str, *, since: str | None = None, dtype: str | None = None,
                   checkpoint: str | None = None, program: bool | None = None,
                   covered: Callable[[dict[str, int]], dict | None] | None = None) -> dict[str, Any]:
    """Export the newest checkpoint (or ``checkpoint``) as a package at ``out``: full, or a
    delta following the package ``since``. ``dtype`` (default ``[export] dtype``) is the
    tables' precision; ``program`` (default ``[export] program``) adds the dense program.
    ``covered(cursor)`` gives the source offsets the model covers (default: read from the
    cache). Returns the summary ``{"package", "kind", "id", "parent", "mapping_version",
    "trained_samples", "rows_written", "bytes", "program", "elapsed_s"}``."""
    t0 = time.perf_counter()
    dtype = dtype or cfg.export.dtype.value
    program = cfg.export.program if program is None else program
    spec = cfg.train_spec()
    doc = package_config(cfg)
    doc_hash = config_hash(doc)
    parent, previous, previous_version = (None, None, None) if since is None else _parent(since, doc_hash, dtype)
    snapshot = snapshot_from_checkpoint(spec, checkpoint)
    version = int(snapshot.counters.get("mapping_version") or 0)
    files, tables, rows_written = package_tables(snapshot.tables, dtype, previous)
    files[CONFIG_FILE] = json_bytes(doc)
    files[DENSE_FILE] = dense_bytes(snapshot.dense)
    if since is None or version != previous_version:
        mappings = MappingStore.from_config(cfg.hash, cfg.cache).load_or_default(cfg.schema, cfg.hash.mapper,
                                                                                 version=version)
        files[MAPPINGS_FILE] = mappings.to_bytes()
    program_error = None
    if program:
        try:
            model = plain_model(spec)
            load_dense(model, snapshot.dense, "the exported dense state")
            files[PROGRAM_FILE] = export_dense_program(model, collection_paths(model), len(cfg.schema.dense))
        except TrainerError as exc:
            program_error = str(exc)
            log.warning("export: %s; the package holds the dense state dict only", exc)
    manifest = {
        "kind": (PackageKind.FULL if since is None else PackageKind.DELTA).value,
        "id": new_package_id(), "parent": parent, "created_ms": int(time.time() * 1000),
        "config_hash": doc_hash, "model_fingerprint": model_fingerprint(spec), "dtype": dtype,
        "mapping_version": version,
        "trained_samples": int(snapshot.counters.get("trained_samples", 0)),
        "trained_batches": int(snapshot.counters.get("trained_batches", 0)),
        "metrics": snapshot.metrics, "cursor": snapshot.cursor,
        "source_offsets": (covered or (lambda c: _covered_from_config(cfg, c)))(snapshot.cursor),
        "checkpoint": snapshot.checkpoint, "tables": tables, "dense": DENSE_FILE,
        "program": PROGRAM_FILE if PROGRAM_FILE in files else None, "program_error": program_error,
        "plugins": list(cfg.pipeline.plugins),
    }
    path = write_package(out, files, manifest)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)
    return {"package": path, "kind": manifest["kind"], "id": manifest["id"],
            "parent": None if parent is None else parent["path"], "mapping_version": version,
            "trained_samples": manifest["trained_samples"], "rows_written": rows_written, "bytes": size,
            "program": manifest["program"] is not None, "elapsed_s": time.perf_counter() - t0}


def _newest_checkpoint(cfg: HeadraceConfig) -> str | None:
    directory = cfg.trainer.checkpoint_dir
    found = latest_sharded_checkpoint(directory) if cfg.sharding.enabled else latest_checkpoint(directory)
    return None if found is None else str(found)


class ExportThread(threading.Thread):
    """``serve``'s scheduled exports: every ``[export] every_s`` seconds the newest checkpoint
    (if it is new) becomes ``<[export] dir>/pkg-<n:08d>``, a delta of the previous package
    unless ``full_every`` exports were made since the last full one (or the previous package
    cannot be followed: config or dtype changed); then all but the newest ``keep`` packages
    (and the bases their deltas need) are deleted. A failed export is logged and tried again
    on the next tick (a checkpoint pruned or a row store moved on meanwhile is normal), so
    exports never stop training. ``reports`` lists each export's summary."""

    def __init__(self, cfg: HeadraceConfig, cache: BatchCache):
        super().__init__(name="model-export", daemon=True)
        self.cfg = cfg
        self.cache = cache
        self.reports: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self._last_checkpoint: str | None = None
        self._stop_event = threading.Event()
        os.makedirs(cfg.export.dir, exist_ok=True)
        remove_stale_temps(cfg.export.dir)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.cfg.export.every_s):
            try:
                self.export_once()
            except HEADRACE_ERRORS as exc:
                if exc.retriable:
                    log.info("scheduled export postponed: %s", exc)
                else:
                    log.error("scheduled export failed: %s", exc)
                    self.error = exc

    def export_once(self) -> dict[str, Any] | None:
        """Export the newest checkpoint now unless it was exported already; the summary, or None."""
        checkpoint = _newest_checkpoint(self.cfg)
        if checkpoint is None or checkpoint == self._last_checkpoint:
            return None
        exp = self.cfg.export
        packages = list_packages(exp.dir)
        since = packages[-1] if packages else None
        if since is not None and len(package_chain(since)) >= exp.full_every:
            since = None
        number = int(os.path.basename(packages[-1])[4:]) + 1 if packages else 1
        out = os.path.join(exp.dir, scheduled_name(number))
        covered = lambda cursor: offsets_covered(self.cache, cursor)  # noqa: E731
        try:
            summary = export_package(self.cfg, out, since=since, checkpoint=checkpoint, covered=covered)
        except (ModelPackageError, TrainerError) as exc:  # the previous package cannot be followed
            if since is None:
                raise
            log.info("export: %s; exporting a full package instead", exc)
            summary = export_package(self.cfg, out, checkpoint=checkpoint, covered=covered)
        self._last_checkpoint = checkpoint
        summary["pruned"] = prune_packages(exp.dir, exp.keep)
        self.reports.append(summary)
        log.info("exported %s (%s, %d rows)", summary["package"], summary["kind"], summary["rows_written"])
        return summary


def check_scoring_config(cfg: HeadraceConfig, manifest_doc: dict[str, Any], where: str) -> None:
    """``score -c C``: the config's schema and filter must be the model's own."""
    mine = package_config(cfg)
    for section in ("schema", "filter"):
        if mine.get(section) != manifest_doc.get(section):
            raise ConfigError(f"[{section}] of the config differs from the one {where} was trained with; "
                              "the model scores events only through its own transforms: leave out -c")
