"""Serving latency of an exported model: ``predict`` on raw events (decode, filter, project,
hash, map, assemble, forward) at batches of 1, 64 and 4,096 events, next to calling the
same model directly on ready tensors (the forward pass alone), measured in the same run on
the CPU. The ratio of the two at 4,096 is the price of turning raw events into features.

    python bench/predict.py [--events 8192] [--tables-rows 100000] [--reps 200] [--threads 1] [--json]

The model: a Criteo-shaped synthetic stream (13 dense, 26 sparse features), trained on
``--events`` events, exported with ``headrace export``'s code and loaded with
``engine.serving.load_model``. With ``--json`` the last line is ``{"batch_1_p99_ms",
"batch_64_p99_ms", "batch_4096_events_per_s", "direct_4096_events_per_s", ...}`` (p50s, the
direct forward's p99s and ``overhead_4096`` = direct / predict events per second too).
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
import torch  # noqa: E402

from engine.config import config_from_dict  # noqa: E402
from engine.export import export_package  # noqa: E402
from engine.serving import load_model  # noqa: E402
from storage.batch_cache import BatchCache  # noqa: E402
from streams.synthetic import SyntheticSpec, generate_payloads, synthetic_config_dict  # noqa: E402
from trainer.loop import ContinuousTrainer  # noqa: E402
from transforms.mappers import MappingSet  # noqa: E402
from transforms.process import TransformSpec, process_batch, source_batch  # noqa: E402

SPEC = SyntheticSpec(num_dense=13, num_sparse=26, cardinality=1_000_000, seed=1)


def build(workdir: str, events: int, table_rows: int) -> str:
    """Train on ``events`` synthetic events and export; returns the package path."""
    doc = synthetic_config_dict(SPEC, rows=table_rows, embedding_dim=16)
    doc["cache"] = {"path": os.path.join(workdir, "cache")}
    doc["trainer"].update({"checkpoint_dir": os.path.join(workdir, "ckpt"), "batch_size": 2048,
                           "bottom_mlp": [64, 16], "top_mlp": [64, 32], "device": "cpu",
                           "checkpoint_every_batches": 1_000_000})
    doc["export"] = {"program": False}
    cfg = config_from_dict(doc)
    spec, mappings = TransformSpec.from_config(cfg), MappingSet.default(cfg.schema, cfg.hash.mapper)
    with BatchCache.from_config(cfg.cache) as cache:
        for start in range(0, events, 4096):
            n = min(4096, events - start)
            cache.write(process_batch(source_batch(generate_payloads(SPEC, n, start), start_offset=start),
                                      spec, mappings))
    ContinuousTrainer(cfg, cfg.cache.path).run()
    return export_package(cfg, os.path.join(workdir, "model"))["package"]


def latencies_ms(fn, reps: int) -> np.ndarray:
    fn()  # warm up
    out = np.empty(reps)
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def run(events: int, table_rows: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="headrace-bench-predict-") as workdir:
        model = load_model(build(workdir, events, table_rows))
        probe = generate_payloads(SPEC, 4096, 10_000_000)
        serving = model.serving_model
        rows = process_batch(source_batch(probe), model.transform_spec(), model.mappings).batch
        ready = {n: serving.batch_of(rows.slice(0, n), 0) for n in (1, 64, 4096)}

        def direct(n: int):
            b = ready[n]
            with torch.inference_mode():
                serving.model(b.dense, b.sparse)

        out: dict = {"events_trained": events, "table_rows": table_rows, "threads": torch.get_num_threads()}
        for n, r in ((1, reps), (64, reps), (4096, max(5, reps // 20))):
            p = latencies_ms(lambda: model.predict(probe[:n]), r)
            d = latencies_ms(lambda: direct(n), r)
            out[f"batch_{n}_p50_ms"] = float(np.percentile(p, 50))
            out[f"batch_{n}_p99_ms"] = float(np.percentile(p, 99))
            out[f"direct_{n}_p50_ms"] = float(np.percentile(d, 50))
            out[f"direct_{n}_p99_ms"] = float(np.percentile(d, 99))
            if n == 4096:
                out["batch_4096_events_per_s"] = float(n / (np.median(p) / 1e3))
                out["direct_4096_events_per_s"] = float(n / (np.median(d) / 1e3))
        out["overhead_4096"] = out["direct_4096_events_per_s"] / out["batch_4096_events_per_s"]
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=8192, help="events to train on before exporting")
    p.add_argument("--table-rows", type=int, default=100_000, help="rows of each of the 26 tables")
    p.add_argument("--reps", type=int, default=200, help="timed calls at batches 1 and 64 (4096: reps / 20)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.events, args.table_rows, args.reps)
    if args.json:
        print(orjson.dumps(result).decode())
        return
    for n in (1, 64, 4096):
        print(f"batch {n:>5}: predict p50 {result[f'batch_{n}_p50_ms']:8.2f} ms  "
              f"p99 {result[f'batch_{n}_p99_ms']:8.2f} ms   | direct forward p50 "
              f"{result[f'direct_{n}_p50_ms']:8.2f} ms  p99 {result[f'direct_{n}_p99_ms']:8.2f} ms")
    print(f"4096-event batches: predict {result['batch_4096_events_per_s']:,.0f} events/s, direct "
          f"{result['direct_4096_events_per_s']:,.0f} events/s ({result['overhead_4096']:.1f}x)")


if __name__ == "__main__":
    main()
