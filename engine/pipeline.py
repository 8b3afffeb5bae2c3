"""The one transform graph, shared by ``serve`` (Kafka, unbounded) and ``backfill`` (replay).

    source ─► ProcessBatches (decode ► filter ► project ► ids ► remap) ─► user plugins ─► WriteToCache

Only the source differs between the two modes; everything a step needs travels in the
element or in config (the id mappings: a ``storage.mapping_store.MappingStore``, a
directory path each worker reads), so the graph runs unchanged on Beam's portable runners.
"""

from __future__ import annotations

import logging
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from engine.cache_sink import WriteToCache
from engine.config import HeadraceConfig, RunnerKind
from engine.plugins import load_plugins
from storage.batch_cache import BatchCache
from storage.mapping_store import MappingStore
from transforms.beam_steps import ApplyPlugins, ProcessBatches, RequiredColumns
from transforms.process import TransformSpec

__all__ = ["make_pipeline", "apply_graph", "plugin_step", "resume_offsets"]

log = logging.getLogger(__name__)


def make_pipeline(cfg: HeadraceConfig, *, streaming: bool) -> beam.Pipeline:
    """A Beam pipeline on the configured runner.

    ``DirectRunner`` maps to Beam's in-process FnApiRunner directly: the generic
    DirectRunner first tries to download the Prism runner binary, which fails offline.
    """
    flags = list(cfg.pipeline.beam_options)
    options = PipelineOptions(flags=flags, streaming=streaming, save_main_session=False)
    if cfg.pipeline.runner is RunnerKind.DIRECT:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(runner=cfg.pipeline.runner.value, options=options)


def apply_graph(source: beam.PCollection, cfg: HeadraceConfig, *, progress_every_s: float = 0.0,
                stop_file: str | None = None, metrics_dir: str | None = None) -> beam.PCollection:
    """Apply the shared graph to a PCollection[SourceBatch]; returns PCollection[int]
    (records accounted per written element). ``stop_file``: a streaming run's stop file (the
    cache writer then waits at the disk reserve instead of failing: ``engine.cache_sink``).
    ``metrics_dir``: where the cache writer leaves metrics snapshots (``engine.metrics``)."""
    processed = source | "Process" >> ProcessBatches(
        TransformSpec.from_config(cfg), MappingStore.from_config(cfg.hash, cfg.cache), default_mapper=cfg.hash.mapper)
    plugins = plugin_step(cfg)
    if plugins is not None:
        processed = processed | "Plugins" >> plugins
    return processed | "Cache" >> WriteToCache(cfg, progress_every_s=progress_every_s, stop_file=stop_file,
                                               metrics_dir=metrics_dir)


def plugin_step(cfg: HeadraceConfig) -> ApplyPlugins | None:
    """The ``[pipeline] plugins``, each output checked to keep the columns the trainer
    reads (a PluginError names the plugin and the column); None without plugins."""
    plugins = load_plugins(cfg.pipeline.plugins)
    if not plugins:
        return None
    return ApplyPlugins(plugins, required=RequiredColumns.for_trainer(TransformSpec.from_config(cfg)))


def resume_offsets(cfg: HeadraceConfig) -> dict[tuple[str, int], int]:
    """Next offset of every (topic, partition) the cache has seen: where sources resume."""
    os.makedirs(cfg.cache.path, exist_ok=True)
    with BatchCache.from_config(cfg.cache) as cache:
        return {(topic, int(part)): off for topic, parts in cache.next_offsets().items()
                for part, off in parts.items()}
