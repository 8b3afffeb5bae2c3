"""Ingest throughput: Kafka -> pipeline -> LMDB cache, events/s per core, against a naive
baseline measured in the same run on the same topic.

Baseline (what one would write first): kafka-python poll, ``orjson.loads`` per event,
``pa.RecordBatch.from_pylist`` per batch, one LMDB put per batch.
headrace: the real bounded pipeline (``ReadKafkaRange`` -> ``ProcessBatches`` ->
``WriteToCache``) on Beam's in-process runner, with Arrow's thread pools capped at one
thread so the figure is per core. Both figures divide events by the process's CPU time
(user + sys) as well as by wall time; the ratio uses wall time. ``steady_*`` leave out
start-up and shutdown (pipeline construction, connecting, the first fetch), which a
long-lived service pays once: events/s from the first batch cached to the last (headrace,
``bench.window.CacheWrites``) and from the first poll that returned records to the end
(baseline).

    python bench/ingest.py [--events 300000] [--metrics off|on|compare] [--json]

With ``--json`` the last line is ``{"events_per_s", "baseline_events_per_s", "ratio",
"steady_events_per_s", "baseline_steady_events_per_s", "steady_ratio",
"bare_consume_events_per_s", ...}``; the last is a bare confluent-kafka ``consume`` loop on the
same topic (the broker's side alone; null without confluent-kafka).
``--metrics on`` runs the pipeline as ``serve``/``backfill`` do, keeping the ingest metrics
and writing their snapshots (``engine.metrics``); ``compare`` runs the pipeline with metrics
off and on ``--repeats`` times each, alternating, and adds ``metrics_overhead`` (1 - median
on / median off, events/s wall) to the result.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench.window import CacheWrites  # noqa: E402
from engine.config import config_from_dict  # noqa: E402
from streams.synthetic import SyntheticSpec, generate_payloads, synthetic_config_dict  # noqa: E402


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _produce(bootstrap: str, topic: str, events: int, unique: int = 20_000) -> None:
    from streams.producer import produce_values

    payloads = generate_payloads(SyntheticSpec(), min(unique, events))
    sent = 0
    while sent < events:
        chunk = payloads[: min(len(payloads), events - sent)]
        sent += produce_values(bootstrap, topic, chunk, partition=0)


def run_baseline(bootstrap: str, topic: str, events: int, workdir: str,
                 batch: int = 4096) -> tuple[float, float, float]:
    import lmdb  # the baseline is deliberately naive and self-contained
    from kafka import KafkaConsumer, TopicPartition

    env = lmdb.open(os.path.join(workdir, "baseline.lmdb"), map_size=1 << 34)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=8 << 20)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    t0, c0 = time.perf_counter(), _cpu_s()
    done, rows, seq, first = 0, [], 0, None
    while done < events:
        for msgs in consumer.poll(timeout_ms=500, max_records=batch).values():
            for m in msgs:
                rows.append(orjson.loads(m.value))
            done += len(msgs)
        if first is None and done:
            first = (time.perf_counter(), done)
        while len(rows) >= batch or (rows and done >= events):
            rb = pa.RecordBatch.from_pylist(rows[:batch])
            rows = rows[batch:]
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, rb.schema) as w:
                w.write_batch(rb)
            with env.begin(write=True) as txn:
                txn.put(seq.to_bytes(8, "big"), sink.getvalue().to_pybytes())
            seq += 1
    end = time.perf_counter()
    wall, cpu = end - t0, _cpu_s() - c0
    consumer.close()
    env.close()
    steady = (events - first[1]) / (end - first[0]) if end > first[0] and events > first[1] else events / wall
    return events / wall, events / cpu, steady


def _config(bootstrap: str, topic: str, client: str, cache_path: str, id_stats: bool = True):
    doc = synthetic_config_dict(SyntheticSpec(), rows=100_000)
    doc["source"] = {"bootstrap": bootstrap, "topics": [topic], "client": client, "max_batch_records": 4096}
    doc["cache"] = {"path": cache_path}
    doc["hash"] = {"stats_enabled": id_stats}
    return config_from_dict(doc)


def run_headrace(bootstrap: str, topic: str, events: int, workdir: str, client: str,
                 id_stats: bool = True, metrics: bool = False, tag: str = "") -> tuple[float, float, dict, float]:
    from engine.backfill import KafkaRange, backfill_pipeline_main
    from storage.batch_cache import BatchCache

    # Warm-up on a scratch cache: imports and Numba compilation are paid once per process,
    # not per event; the timed run below measures the steady state of a long-lived service.
    warm = _config(bootstrap, topic, client, os.path.join(workdir, "warmup"))
    backfill_pipeline_main(warm, None, KafkaRange(topic, start_offset=0, end_offset=min(events, 8192)))
    cfg = _config(bootstrap, topic, client, os.path.join(workdir, f"cache-{id_stats}{tag}"), id_stats)
    metrics_dir = os.path.join(workdir, f"metrics{tag}") if metrics else None
    t0, c0 = time.perf_counter(), _cpu_s()
    with CacheWrites() as watch:
        backfill_pipeline_main(cfg, None, KafkaRange(topic, start_offset=0, end_offset=events), metrics_dir)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    with BatchCache.from_config(cfg.cache, readonly=True) as cache:
        counts = cache.counts()
    if counts["read"] != events:
        raise SystemExit(f"pipeline read {counts['read']} of {events} events")
    return events / wall, events / cpu, counts, watch.events_per_s(fallback=events / wall)


def run_bare_consume(bootstrap: str, topic: str, events: int, batch: int = 4096) -> float | None:
    """The broker's side alone: a bare confluent-kafka ``consume(batch)`` loop taking each
    message's value and nothing else (events/s wall), or None without confluent-kafka. The
    pipeline's figure is compared with this to say whether the broker is the ceiling."""
    try:
        import confluent_kafka as ck
    except ImportError:
        return None
    consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-bare", "enable.auto.commit": False})
    consumer.assign([ck.TopicPartition(topic, 0, 0)])
    value = ck.Message.value
    t0, done = time.perf_counter(), 0
    while done < events:
        done += len(list(map(value, consumer.consume(num_messages=batch, timeout=0.5))))
    wall = time.perf_counter() - t0
    consumer.close()
    return events / wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--client", default="auto", choices=["auto", "kafka-python", "confluent"])
    ap.add_argument("--metrics", choices=["off", "on", "compare"], default="off",
                    help="keep the ingest metrics as serve does (compare: off and on, alternating)")
    ap.add_argument("--repeats", type=int, default=3, help="with --metrics compare: runs of each")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    from streams.admin import create_topic
    from streams.broker import EmbeddedBroker

    with tempfile.TemporaryDirectory() as workdir, EmbeddedBroker() as broker:
        topic = "bench-ingest"
        create_topic(broker.bootstrap, topic, partitions=1)
        print(f"producing {args.events:,} Criteo-shaped JSON events...", file=sys.stderr)
        _produce(broker.bootstrap, topic, args.events)
        bare = run_bare_consume(broker.bootstrap, topic, args.events)
        if bare is not None:
            print(f"bare consume: {bare:,.0f} events/s wall (confluent-kafka, values only)", file=sys.stderr)
        base_wall, base_cpu, base_steady = run_baseline(broker.bootstrap, topic, args.events, workdir)
        print(f"baseline : {base_wall:,.0f} events/s wall, {base_cpu:,.0f} events/cpu-s, "
              f"{base_steady:,.0f} events/s steady", file=sys.stderr)
        ours_wall, ours_cpu, counts, ours_steady = run_headrace(broker.bootstrap, topic, args.events, workdir,
                                                                args.client, metrics=args.metrics == "on")
        print(f"headrace : {ours_wall:,.0f} events/s wall, {ours_cpu:,.0f} events/cpu-s, "
              f"{ours_steady:,.0f} events/s steady (cached {counts['cached_rows']:,}; metrics {args.metrics})",
              file=sys.stderr)
        overhead = _metrics_overhead(broker.bootstrap, topic, args, workdir) if args.metrics == "compare" else None
        # The same pipeline without the id statistics kept for learned hashing ([hash] stats_enabled).
        bare_wall, bare_cpu, _, _ = run_headrace(broker.bootstrap, topic, args.events, workdir, args.client, False)
        print(f"headrace without id stats: {bare_wall:,.0f} events/s wall, {bare_cpu:,.0f} events/cpu-s",
              file=sys.stderr)
    result = {
        "events_per_s": ours_wall, "baseline_events_per_s": base_wall, "ratio": ours_wall / base_wall,
        "events_per_cpu_s": ours_cpu, "baseline_events_per_cpu_s": base_cpu, "events": args.events,
        "client": args.client,
        "no_id_stats_events_per_s": bare_wall, "no_id_stats_events_per_cpu_s": bare_cpu,
        "cpu_ratio": ours_cpu / base_cpu,
        "steady_events_per_s": ours_steady, "baseline_steady_events_per_s": base_steady,
        "steady_ratio": ours_steady / base_steady, "bare_consume_events_per_s": bare,
    }
    if overhead is not None:
        result.update(overhead)
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        print(f"headrace {ours_wall:,.0f} ev/s vs baseline {base_wall:,.0f} ev/s: {result['ratio']:.1f}x")
    return 0


def _metrics_overhead(bootstrap: str, topic: str, args, workdir: str) -> dict:
    """The pipeline with metrics off and on, alternating (so drift hits both alike)."""
    import statistics

    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(args.repeats):
        for metrics in (False, True):
            wall, cpu, _, _ = run_headrace(bootstrap, topic, args.events, workdir, args.client,
                                        metrics=metrics, tag=f"-m{int(metrics)}-{i}")
            runs[metrics].append((wall, cpu))
            print(f"metrics {'on ' if metrics else 'off'} run {i}: {wall:,.0f} events/s wall, "
                  f"{cpu:,.0f} events/cpu-s", file=sys.stderr)
    off = statistics.median(w for w, _ in runs[False])
    on = statistics.median(w for w, _ in runs[True])
    off_cpu = statistics.median(c for _, c in runs[False])
    on_cpu = statistics.median(c for _, c in runs[True])
    print(f"metrics overhead: {100 * (1 - on / off):+.1f}% wall, {100 * (1 - on_cpu / off_cpu):+.1f}% per CPU-s "
          f"(medians of {args.repeats})", file=sys.stderr)
    return {"metrics_off_events_per_s": off, "metrics_on_events_per_s": on,
            "metrics_off_events_per_cpu_s": off_cpu, "metrics_on_events_per_cpu_s": on_cpu,
            "metrics_overhead": 1 - on / off, "metrics_overhead_cpu": 1 - on_cpu / off_cpu,
            "metrics_runs": {"off": runs[False], "on": runs[True]}}


if __name__ == "__main__":
    sys.exit(main())
