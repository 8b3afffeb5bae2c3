"""Scaling out one host's ingest: the same events backfilled from files with ``[pipeline]
workers = 1`` and ``workers = 2`` (N pipeline processes, one LMDB cache).

Each measurement is a function ``(args, workdir, files) -> dict`` in ``MEASUREMENTS``; add
one there to report more (another runner, more workers). A backfill measurement runs the
real ``engine.backfill.backfill`` (child processes, as the CLI does) on a fresh cache and
reports two rates: ``events_per_s`` over the ingest window (first event cached to last:
the steady state, without the workers' start-up) and ``wall_events_per_s`` (the whole
command, start-up included).

    python bench/scale.py [--events 400000] [--files 8] [--only workers_1,workers_2] [--no-feed] [--json]

With ``--json`` the last line holds ``workers_1_events_per_s``, ``workers_2_events_per_s``
(and ``*_wall_events_per_s``, ``*_elapsed_s``, ``speedup_2_over_1``, ``events``, ``cpus``);
``dask_1``/``dask_2`` (in ``--only``'s default) add the same for a backfill on a Dask
``LocalCluster`` of 1 and 2 worker processes, and ``dask_*_staging_us_per_event``. Unless
``--no-feed``: ``local_train_samples_per_s`` and ``feed_train_samples_per_s`` (training from
the local cache vs from ``headrace feed`` over loopback, ``bench/feed.py``) and ``feed_ratio``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402

from bench.window import CacheWatcher  # noqa: E402
from engine.config import config_from_dict  # noqa: E402
from streams.synthetic import SyntheticSpec, generate_payloads, synthetic_config_dict  # noqa: E402


def write_files(workdir: str, events: int, files: int) -> list[str]:
    """``files`` JSON-lines files holding ``events`` Criteo-shaped events in all."""
    payloads = generate_payloads(SyntheticSpec(), min(events, 50_000))
    paths = []
    per_file = -(-events // files)
    for f in range(files):
        n = min(per_file, events - f * per_file)
        path = os.path.join(workdir, f"events-{f:03d}.jsonl")
        with open(path, "wb") as fh:
            for i in range(f * per_file, f * per_file + n):
                fh.write(payloads[i % len(payloads)] + b"\n")
        paths.append(path)
    return paths


def scale_config(cache_path: str, **pipeline):
    doc = synthetic_config_dict(SyntheticSpec(), rows=100_000)
    doc["source"] = {"max_batch_records": 4096}
    doc["cache"] = {"path": cache_path}
    doc["metrics"] = {"listen": ""}
    doc["pipeline"] = pipeline
    return config_from_dict(doc)


def timed_backfill(cfg, files: list[str], events: int) -> dict:
    """``backfill`` of ``files`` into ``cfg``'s (fresh) cache (in this, the main thread: it
    starts child processes), its cache counts polled by a thread to find the ingest window."""
    from engine.backfill import backfill
    from engine.progress import ProgressLine

    t0 = time.monotonic()
    with CacheWatcher(cfg) as watch:
        result = backfill(cfg, paths=files, progress=ProgressLine(enabled=False))
    wall = time.monotonic() - t0
    if result["read"] != events:
        raise SystemExit(f"backfill read {result['read']} of {events} events")
    return {"events_per_s": watch.events_per_s(fallback=events / wall), "wall_events_per_s": events / wall,
            "elapsed_s": wall}


def backfill_workers(workers: int) -> Callable[[argparse.Namespace, str, list[str]], dict]:
    def measure(args: argparse.Namespace, workdir: str, files: list[str]) -> dict:
        cfg = scale_config(os.path.join(workdir, f"cache-workers-{workers}"), workers=workers)
        return timed_backfill(cfg, files, args.events)

    return measure


def backfill_dask(workers: int, args: argparse.Namespace, workdir: str, files: list[str]) -> dict:
    """``runner = "DaskRunner"`` on a ``LocalCluster`` of ``workers`` processes (one thread
    each), started and warmed (4 small files per worker into a throwaway cache) before the
    clock: a standing cluster has its imports done. Beam's DaskRunner runs each step of a
    task (a file) to its end before the next, so nothing is cached before a file is fully
    processed: ``events_per_s`` (the ingest window) measures the staged import, and
    ``wall_events_per_s`` is the figure to compare. Adds ``staging_us_per_event``: what the
    staged cache write (``engine.staged_sink``) costs per event, staging and loading back
    the run's batches alone, on one core."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        options = {"runner": "DaskRunner", "beam_options": [f"--dask_client_address={cluster.scheduler_address}"]}
        warm_dir = os.path.join(workdir, f"warm-dask-{workers}")
        os.makedirs(warm_dir)
        warm_events = 4000 * workers
        timed_backfill(scale_config(os.path.join(workdir, f"cache-dask-{workers}-warm"), **options),
                       write_files(warm_dir, warm_events, 4 * workers), warm_events)
        cfg = scale_config(os.path.join(workdir, f"cache-dask-{workers}"), **options)
        got = timed_backfill(cfg, files, args.events)
    return {**got, "staging_us_per_event": staging_us_per_event(cfg)}


def staging_us_per_event(cfg) -> float:
    import pickle

    import numpy as np

    from engine.staged_sink import stage_batch, staging_area
    from storage.batch_cache import BatchCache
    from transforms.elements import ProcessedBatch

    with BatchCache.from_config(cfg.cache, readonly=True) as cache:
        batches = [ProcessedBatch(b.topic, b.partition, b.start_offset, b.end_offset, 0, b.batch, (),
                                  np.empty(0, np.int64), b.batch.num_rows) for b in cache.iter_batches()]
    t0 = time.perf_counter()
    with staging_area(cfg.cache.path) as staging:
        for pb in batches:
            path = stage_batch(staging, pb)
            with open(path, "rb") as fh:
                pickle.load(fh)
            os.unlink(path)
    return (time.perf_counter() - t0) * 1e6 / max(1, sum(pb.read for pb in batches))


def dask_1_events_per_s(args: argparse.Namespace, workdir: str, files: list[str]) -> dict:
    """Backfill on 1 Dask worker process (``backfill_dask``)."""
    return backfill_dask(1, args, workdir, files)


def dask_2_events_per_s(args: argparse.Namespace, workdir: str, files: list[str]) -> dict:
    """Backfill on 2 Dask worker processes (``backfill_dask``)."""
    return backfill_dask(2, args, workdir, files)


def train_from_feed(args: argparse.Namespace) -> dict:
    """Training from the local cache vs from ``headrace feed`` over loopback: ``bench/feed.py``'s
    alternating comparison (its keys, unprefixed: ``local_train_samples_per_s``,
    ``feed_train_samples_per_s``, ``ratio``...)."""
    from bench.feed import compare

    got = compare(rows=args.train_rows, repeats=args.train_repeats, log=lambda line: print(line, file=sys.stderr))
    return {f"feed_{k}" if k in ("ratio", "rows", "repeats", "runs") else k: v for k, v in got.items()}


#: name -> measurement; each result's keys are reported prefixed with ``<name>_``.
MEASUREMENTS: dict[str, Callable[[argparse.Namespace, str, list[str]], dict]] = {
    "workers_1": backfill_workers(1),
    "workers_2": backfill_workers(2),
    "dask_1": dask_1_events_per_s,
    "dask_2": dask_2_events_per_s,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated measurements to run")
    ap.add_argument("--train-rows", type=int, default=200_000, help="rows trained per run for the feed comparison")
    ap.add_argument("--train-repeats", type=int, default=3)
    ap.add_argument("--no-feed", action="store_true", help="skip training from a feed vs the local cache")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(MEASUREMENTS))
    if unknown:
        ap.error(f"unknown measurement(s) {unknown}; known: {sorted(MEASUREMENTS)}")
    result: dict = {"events": args.events, "files": args.files, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as workdir:
        files = write_files(workdir, args.events, args.files)
        for name in names:
            got = MEASUREMENTS[name](args, workdir, files)
            print(f"{name}: {got['events_per_s']:,.0f} events/s ingesting, {got['wall_events_per_s']:,.0f} "
                  f"events/s wall ({got['elapsed_s']:.1f} s)", file=sys.stderr)
            result.update({f"{name}_{k}": v for k, v in got.items()})
    if not args.no_feed:
        result.update(train_from_feed(args))
    if "workers_1_events_per_s" in result and "workers_2_events_per_s" in result:
        result["speedup_2_over_1"] = result["workers_2_events_per_s"] / result["workers_1_events_per_s"]
    print(orjson.dumps(result).decode() if args.json else
          "\n".join(f"{k}: {v:,.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
