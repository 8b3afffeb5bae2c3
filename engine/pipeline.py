"""The one transform graph, shared by ``serve`` (Kafka, unbounded) and ``backfill`` (replay).

    source ─► ProcessBatches (decode ► filter ► project ► ids ► remap) ─► user plugins ─► WriteToCache

Only the source differs between the two modes; everything a step needs travels in the
element or in config (the id mappings: a ``storage.mapping_store.MappingStore``, a
directory path each worker reads), so the graph runs unchanged on Beam's portable runners.
A bounded run on any runner but the in-process Direct one ends in ``StageBatches`` instead
of ``WriteToCache``, and this process imports the staged batches (``engine.staged_sink``).
"""

from __future__ import annotations

import logging
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from engine.beam_compat import apply_beam_fixes
from engine.cache_sink import CacheSession, WriteToCache
from engine.config import HeadraceConfig, RunnerKind
from engine.errors import ConfigError
from engine.plugins import load_plugins
from engine.staged_sink import StageBatches, StagedImporter, run_with_import, staging_area
from storage.batch_cache import BatchCache
from storage.mapping_store import MappingStore
from transforms.beam_steps import ApplyPlugins, ProcessBatches, RequiredColumns
from transforms.process import TransformSpec

__all__ = ["make_pipeline", "apply_graph", "run_bounded", "plugin_step", "resume_offsets"]

log = logging.getLogger(__name__)


def make_pipeline(cfg: HeadraceConfig, *, streaming: bool, parallelism: int | None = None) -> beam.Pipeline:
    """A Beam pipeline on the configured runner.

    ``DirectRunner`` maps to Beam's in-process FnApiRunner directly: the generic
    DirectRunner first tries to download the Prism runner binary, which fails offline.
    ``DaskRunner``: Beam's runner on ``dask.distributed``; ``parallelism`` (the source's
    element count, e.g. files) becomes ``--dask_npartitions`` unless ``beam_options`` size
    the partitions (Beam's default puts up to 128 elements in one task, i.e. one worker).
    """
    apply_beam_fixes()  # engine.beam_compat: FnApiRunner's per-bundle metrics leak
    flags = list(cfg.pipeline.beam_options)
    if cfg.pipeline.runner is RunnerKind.DASK and parallelism and not any(
            f.startswith(("--dask_npartitions", "--dask_partition_size")) for f in flags):
        flags.append(f"--dask_npartitions={parallelism}")
    options = PipelineOptions(flags=flags, streaming=streaming, save_main_session=False)
    if cfg.pipeline.runner is RunnerKind.DIRECT:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    if cfg.pipeline.runner is RunnerKind.DASK:
        if streaming:
            raise ConfigError('[pipeline] runner = "DaskRunner" runs bounded pipelines only (backfill); '
                              'serve reads Kafka without end: use "DirectRunner" there')
        return beam.Pipeline(runner=_dask_runner(), options=options)
    return beam.Pipeline(runner=cfg.pipeline.runner.value, options=options)


def _dask_runner():
    try:
        import dask.distributed  # noqa: F401  (Beam's module imports it lazily, then fails late)
        from apache_beam.runners.dask.dask_runner import DaskRunner
    except ImportError as exc:
        raise ConfigError(f'[pipeline] runner = "DaskRunner" needs dask.distributed, which is not installed '
                          f"({exc}); install it with: pip install 'headrace[dask]'") from None
    return DaskRunner()


def _run(pipeline: beam.Pipeline, cfg: HeadraceConfig) -> None:
    """Run ``pipeline`` to its end; an unreachable Dask scheduler is a ConfigError naming the option."""
    try:
        result = pipeline.run()
    except OSError as exc:
        if cfg.pipeline.runner is not RunnerKind.DASK:
            raise
        address = next((f for f in cfg.pipeline.beam_options if f.startswith("--dask_client_address")),
                       "--dask_client_address (not set: a local cluster)")
        raise ConfigError(f"[pipeline] beam_options {address}: cannot reach the Dask scheduler ({exc}); "
                          f"start it (dask scheduler) or fix the address; --dask_connection_timeout sets "
                          f"how long to try") from None
    try:
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)  # DaskRunnerResult: this run's own connection
        if client is not None:
            client.close()


def apply_graph(source: beam.PCollection, cfg: HeadraceConfig, *, progress_every_s: float = 0.0,
                stop_file: str | None = None, metrics_dir: str | None = None,
                staging_dir: str | None = None) -> beam.PCollection:
    """Apply the shared graph to a PCollection[SourceBatch]; returns PCollection[int]
    (records accounted per written element). ``stop_file``: a streaming run's stop file (the
    cache writer then waits at the disk reserve instead of failing: ``engine.cache_sink``).
    ``metrics_dir``: where the cache writer leaves metrics snapshots (``engine.metrics``).
    ``staging_dir``: stage the batches there instead of writing the cache
    (``engine.staged_sink``; ``run_bounded`` imports them)."""
    processed = source | "Process" >> ProcessBatches(
        TransformSpec.from_config(cfg), MappingStore.from_config(cfg.hash, cfg.cache), default_mapper=cfg.hash.mapper)
    plugins = plugin_step(cfg)
    if plugins is not None:
        processed = processed | "Plugins" >> plugins
    if staging_dir is not None:
        return processed | "Stage" >> StageBatches(staging_dir)
    return processed | "Cache" >> WriteToCache(cfg, progress_every_s=progress_every_s, stop_file=stop_file,
                                               metrics_dir=metrics_dir)


def run_bounded(pipeline: beam.Pipeline, source: beam.PCollection, cfg: HeadraceConfig, *,
                metrics_dir: str | None = None) -> None:
    """Apply the graph to a bounded ``source`` and run it to its end. On the in-process
    Direct runner one writer instance sees every batch and writes the cache in the graph;
    on any other runner the workers stage the batches and this process imports them in
    offset order as they come (``engine.staged_sink``)."""
    if cfg.pipeline.runner is RunnerKind.DIRECT:
        apply_graph(source, cfg, metrics_dir=metrics_dir)
        _run(pipeline, cfg)
        return
    with staging_area(cfg.cache.path) as staging_dir, CacheSession(cfg, metrics_dir=metrics_dir) as session:
        apply_graph(source, cfg, staging_dir=staging_dir)
        run_with_import(lambda: _run(pipeline, cfg), StagedImporter(staging_dir, session.cache, session.writer.write))


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
