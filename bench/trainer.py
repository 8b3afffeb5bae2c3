"""Continuous-trainer throughput: samples/s of the DLRM trained from an LMDB cache, next to
loading alone (cache -> training batches) measured in the same run, on CPU and, when one is
present, on a GPU.

The loading figure is the baseline the trainer must stay under: when loading is many
times faster than a step, the trainer never waits for data (``data_wait_fraction``).

    python bench/trainer.py [--rows 100000] [--table-rows 100000] [--threads 1]
                            [--metrics off|on|compare] [--json]

With ``--json`` the last line is ``{"results": [{"device", "samples_per_s",
"load_samples_per_s", "data_wait_fraction", "step_ms"}], ...}``. ``--metrics on`` trains as
``serve``'s trainer does: step-time and freshness numbers kept, a progress report at least
every second turned into a metrics snapshot file (``engine.metrics``), a metrics history
record every ``[trainer] history_every_s`` (``trainer.history``); ``compare`` trains
with metrics off and on ``--repeats`` times each, alternating, and adds
``metrics_overhead`` (1 - median on / median off samples/s) per device, and
``metrics_overhead_cpu`` (the same per CPU-second of the process), and ``metrics_cost_fraction``:
the metrics' own work timed piece by piece beside the step time (see ``_metrics_cost``),
the figure to trust on a shared machine where run-to-run throughput drifts by more than 3%.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from engine.config import config_from_dict  # noqa: E402
from storage.batch_cache import BatchCache  # noqa: E402
from streams.synthetic import SyntheticSpec, generate_arrays, synthetic_config_dict  # noqa: E402
from trainer.data import BatchLayout, TrainingStream  # noqa: E402
from trainer.loop import ContinuousTrainer  # noqa: E402
from transforms.elements import ProcessedBatch  # noqa: E402


def fill_cache(cfg, spec: SyntheticSpec, rows: int, batch_rows: int = 4096, first_offset: int = 0) -> None:
    """Cache batches shaped like the pipeline's output (no Kafka: this measures the trainer):
    synthetic events ``[first_offset, first_offset + rows)`` of partition 0 of topic "bench"."""
    table_rows = cfg.schema.sparse[0].rows
    end = first_offset + rows
    with BatchCache.from_config(cfg.cache) as cache:
        for start in range(first_offset, end, batch_rows):
            n = min(batch_rows, end - start)
            a = generate_arrays(spec, n, start)
            cols = {"label": pa.array(a.labels)}
            dense = np.log1p(np.nan_to_num(a.dense, nan=0.0)).astype(np.float32)
            for j, f in enumerate(cfg.schema.dense):
                cols[f.name] = pa.array(dense[:, j])
            for j, f in enumerate(cfg.schema.sparse):
                cols[f.name] = pa.array(a.ids[:, j] % table_rows)
                cols[f.name + ".id"] = pa.array(a.ids[:, j])
            cols["_offset"] = pa.array(np.arange(start, start + n, dtype=np.int64))
            cols["_event_time_ms"] = pa.array(a.event_time_ms)
            cache.write(ProcessedBatch("bench", 0, start, start + n, 0, pa.record_batch(cols), (),
                                       np.empty(0, np.int64), read=n))


def train_once(cfg, device: str, metrics: bool, snapshot_dir: str) -> dict:
    """One training run from the start of the cache (fresh checkpoint dir each time)."""
    if not metrics:
        return ContinuousTrainer(cfg, device=device, live_metrics=False).run()
    from engine.metrics import TrainerReporter
    from engine.train import train

    # serve's trainer child, as it runs: live metrics, snapshots, the metrics history.
    return train(cfg, on_progress=TrainerReporter(snapshot_dir).report, handle_signals=False, endpoint=False)


def measure(cfg, device: str, metrics: bool = False, snapshot_dir: str = "") -> dict:
    layout = BatchLayout.from_config(cfg)
    with BatchCache.from_config(cfg.cache, readonly=True) as cache:
        t0, samples = time.perf_counter(), 0
        stream = TrainingStream(lambda s, stop: cache.iter_batches(s, stop=stop), layout, cfg.trainer.batch_size,
                                prefetch_batches=0)
        for item in stream:
            samples += item.batch.batch_size
        load_s = time.perf_counter() - t0
    summary = train_once(cfg, device, metrics, snapshot_dir)
    batches = max(summary["trained_batches"], 1)
    return {
        "device": device, "samples_per_s": summary["samples_per_s"], "load_samples_per_s": samples / load_s,
        "data_wait_fraction": summary["data_wait_fraction"],
        "step_ms": 1000 * (summary["elapsed_s"] - summary["data_wait_s"]) / batches,
        "trained_samples": summary["trained_samples"], "auc": summary["auc"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--table-rows", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--metrics", choices=["off", "on", "compare"], default="off",
                    help="keep the live metrics as serve's trainer does (compare: off and on, alternating)")
    ap.add_argument("--repeats", type=int, default=3, help="with --metrics compare: runs of each")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = SyntheticSpec(cardinality=args.table_rows)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        doc = synthetic_config_dict(spec, rows=args.table_rows)
        doc["cache"] = {"path": os.path.join(tmp, "cache")}
        cfg0 = config_from_dict(doc)
        fill_cache(cfg0, spec, args.rows)
        for device in devices:
            doc["trainer"].update({"checkpoint_dir": os.path.join(tmp, f"ckpt-{device}"), "batch_size": args.batch_size,
                                   "checkpoint_every_batches": 10**6, "device": device,
                                   "batch_ramp_samples": 0})  # steady-state steps, not the start's small ones
            r = measure(config_from_dict(doc), device, args.metrics == "on", os.path.join(tmp, "metrics"))
            print(f"{device}: {r['samples_per_s']:,.0f} samples/s trained, {r['load_samples_per_s']:,.0f} "
                  f"samples/s loaded alone, data wait {100 * r['data_wait_fraction']:.1f}% "
                  f"(metrics {args.metrics})", file=sys.stderr)
            if args.metrics == "compare":
                r.update(_metrics_overhead(doc, device, tmp, args.repeats))
                r.update(_metrics_cost(doc, tmp, args.batch_size, r["metrics_off_samples_per_cpu_s"]))
            results.append(r)
    out = {"results": results, "rows": args.rows, "table_rows": args.table_rows, "threads": args.threads}
    if args.json:
        print(orjson.dumps(out).decode())
    return 0


def _timed(fn, n: int) -> float:
    """CPU seconds of this process per call of ``fn()``, over ``n`` calls (CPU time, not wall:
    other processes on a shared machine inflate it far less)."""
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


def _metrics_cost(doc: dict, tmp: str, batch_size: int, samples_per_cpu_s: float) -> dict:
    """What keeping the metrics costs, timed piece by piece in CPU time, against the CPU time
    of training measured in the same run (``samples_per_cpu_s``, metrics off): steadier than
    on/off throughput on a busy machine. Per step: the live numbers (step time, each row's
    freshness); per progress report (one a second, ``engine.train.PROGRESS_EVERY_S``): the
    metrics summary (exact window AUC, freshness quantiles) and the snapshot file; per
    history record (every ``[trainer] history_every_s``): the record. A report's cost is
    spread over the samples trained in a second at ``samples_per_cpu_s`` (the trainer using
    one core). ``metrics_cost_fraction``: the metrics' CPU over training's."""
    from engine.metrics import TrainerReporter
    from engine.train import PROGRESS_EVERY_S
    from trainer.history import MetricsRecorder
    from trainer.live_metrics import LiveMetrics
    from trainer.metrics import ProgressiveMetrics

    doc["trainer"]["checkpoint_dir"] = os.path.join(tmp, "ckpt-cost")
    cfg = config_from_dict(doc)
    window = cfg.trainer.metrics_window
    rng = np.random.default_rng(0)
    live = LiveMetrics(window)
    event_ms = (time.time() * 1000 - rng.uniform(0, 5000, batch_size)).astype(np.int64)
    step_s = _timed(lambda: live.observe_step(0.01, event_ms, time.time()), 2000)
    scores = ProgressiveMetrics(window)
    scores.update(rng.normal(size=window).astype(np.float32), (rng.random(window) < 0.3).astype(np.float32))
    summary_s = _timed(lambda: (scores.summary(), live.summary()), 30)
    progress = {**scores.summary(), **live.summary(), "trained_samples": 10**6, "total_trained_samples": 10**6,
                "total_trained_batches": 10**3, "samples_per_s": 1e4, "data_wait_s": 1.0, "data_wait_fraction": 0.01}
    reporter = TrainerReporter(os.path.join(tmp, "cost-metrics"))
    report_s = _timed(lambda: reporter.report(progress), 50)
    recorder = MetricsRecorder(cfg)
    record_s = _timed(lambda: recorder.record(progress), 50)
    recorder.close()
    per_report = samples_per_cpu_s * PROGRESS_EVERY_S
    per_record = samples_per_cpu_s * max(cfg.trainer.history_every_s, PROGRESS_EVERY_S)
    metrics_cpu_per_sample = step_s / batch_size + (summary_s + report_s) / per_report + record_s / per_record
    fraction = metrics_cpu_per_sample * samples_per_cpu_s
    print(f"metrics cost (CPU): {1e6 * step_s:,.0f} us per step of {batch_size}, {1e3 * summary_s:.2f} ms summary + "
          f"{1e3 * report_s:.2f} ms snapshot per report, {1e3 * record_s:.3f} ms per history record: "
          f"{100 * fraction:.2f}% of training's CPU at {samples_per_cpu_s:,.0f} samples per CPU-s", file=sys.stderr)
    return {"metrics_cost_per_step_us": 1e6 * step_s, "metrics_summary_ms": 1e3 * summary_s,
            "metrics_snapshot_ms": 1e3 * report_s, "history_record_ms": 1e3 * record_s,
            "metrics_cost_fraction": fraction}


def _metrics_overhead(doc: dict, device: str, tmp: str, repeats: int) -> dict:
    """Training samples/s with metrics off and on, alternating (so drift hits both alike)."""
    import statistics

    import engine.metrics  # noqa: F401 - imported before timing, not inside the first "on" run
    import engine.train  # noqa: F401

    rates: dict[bool, list[float]] = {False: [], True: []}
    per_cpu: dict[bool, list[float]] = {False: [], True: []}  # samples per CPU-second of this process
    for i in range(repeats):
        for metrics in (False, True):
            doc["trainer"]["checkpoint_dir"] = os.path.join(tmp, f"ckpt-{device}-m{int(metrics)}-{i}")
            cfg = config_from_dict(doc)
            cpu0 = time.process_time()
            summary = train_once(cfg, device, metrics, os.path.join(tmp, "metrics"))
            cpu_s = time.process_time() - cpu0
            rates[metrics].append(summary["samples_per_s"])
            per_cpu[metrics].append(summary["trained_samples"] / cpu_s)
            print(f"{device} metrics {'on ' if metrics else 'off'} run {i}: {summary['samples_per_s']:,.0f} "
                  f"samples/s, {per_cpu[metrics][-1]:,.0f} samples per CPU-s", file=sys.stderr)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    off_cpu, on_cpu = statistics.median(per_cpu[False]), statistics.median(per_cpu[True])
    print(f"{device} metrics overhead: {100 * (1 - on / off):+.1f}% wall, {100 * (1 - on_cpu / off_cpu):+.1f}% per "
          f"CPU-s (medians of {repeats})", file=sys.stderr)
    return {"metrics_off_samples_per_s": off, "metrics_on_samples_per_s": on, "metrics_overhead": 1 - on / off,
            "metrics_off_samples_per_cpu_s": off_cpu, "metrics_on_samples_per_cpu_s": on_cpu,
            "metrics_overhead_cpu": 1 - on_cpu / off_cpu,
            "metrics_runs": {"off": rates[False], "on": rates[True]}}


if __name__ == "__main__":
    sys.exit(main())
