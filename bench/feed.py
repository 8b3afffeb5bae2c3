"""Training from an Arrow Flight feed over loopback vs from the local cache, in one run.

The same cache is trained from twice per repeat, alternating so machine drift hits both
alike: once read locally (LMDB), once through ``headrace feed`` (a separate process on
127.0.0.1) with ``[trainer] feeds``. The figure is the ratio of the medians
(``feed_train_samples_per_s / local_train_samples_per_s``; the target is >= 0.8). Loading
alone (cache or feed -> training batches, no model) is measured beside it: the data path's
headroom over the step.

    python bench/feed.py [--rows 200000] [--batch-size 1024] [--repeats 3] [--device cpu] [--json]

With ``--json`` the last line is ``{"local_train_samples_per_s", "feed_train_samples_per_s",
"ratio", "local_load_samples_per_s", "feed_load_samples_per_s", "device", "rows", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402
import torch  # noqa: E402

from bench.trainer import fill_cache  # noqa: E402
from engine.config import config_from_dict  # noqa: E402
from storage.batch_cache import BatchCache  # noqa: E402
from streams.synthetic import SyntheticSpec, synthetic_config_dict  # noqa: E402
from trainer.data import BatchLayout, TrainingStream  # noqa: E402
from trainer.feed_reader import FeedReader  # noqa: E402
from trainer.loop import ContinuousTrainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_feed(cache_path: str, tmp: str) -> tuple[subprocess.Popen, str]:
    """``headrace feed`` on the cache, on a free loopback port; returns (process, url)."""
    cfg = os.path.join(tmp, "feed.toml")
    with open(cfg, "w") as fh:
        fh.write(f"[cache]\npath = {json.dumps(cache_path)}\n")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "feed", "-c", cfg, "--listen", "127.0.0.1:0",
                             "--json"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"headrace feed exited with {proc.wait()}")
    return proc, json.loads(line)["feed"]


def load_rate(open_batches, cfg) -> float:
    """Samples/s of cutting training batches from ``open_batches`` alone (no model)."""
    t0, samples = time.perf_counter(), 0
    for item in TrainingStream(open_batches, BatchLayout.from_config(cfg), cfg.trainer.batch_size, prefetch_batches=0):
        samples += item.batch.batch_size
    return samples / (time.perf_counter() - t0)


def compare(rows: int = 200_000, *, table_rows: int = 100_000, batch_size: int = 1024, repeats: int = 3,
            device: str = "cpu", log=print) -> dict:
    """The figures of this benchmark (see the module docstring); ``log`` gets progress lines."""
    spec = SyntheticSpec(cardinality=table_rows)
    with tempfile.TemporaryDirectory() as tmp:
        doc = synthetic_config_dict(spec, rows=table_rows)
        doc["cache"] = {"path": os.path.join(tmp, "cache")}
        cfg0 = config_from_dict(doc)
        fill_cache(cfg0, spec, rows)
        feed, url = start_feed(doc["cache"]["path"], tmp)
        try:
            with BatchCache.from_config(cfg0.cache, readonly=True) as cache:
                local_load = load_rate(lambda s, stop: cache.iter_batches(s, stop=stop), cfg0)
            feed_load = load_rate(lambda s, stop: FeedReader([url]).iter_batches(s, stop=stop), cfg0)
            rates: dict[str, list[float]] = {"local": [], "feed": []}

            def train(name: str, feeds: list[str], **kw) -> dict:
                doc["trainer"].update({"checkpoint_dir": os.path.join(tmp, f"ckpt-{name}"), "batch_size": batch_size,
                                       "checkpoint_every_batches": 10**6, "device": device, "feeds": feeds,
                                       "batch_ramp_samples": 0})  # whole batches: the rate under study
                return ContinuousTrainer(config_from_dict(doc), live_metrics=False, **kw).run()

            train("warmup", [], max_batches=20)  # one-time costs (allocator, kernels) out of the first run
            for i in range(repeats):
                for kind in ("local", "feed"):
                    summary = train(f"{kind}-{i}", [url] if kind == "feed" else [])
                    assert summary["trained_samples"] == rows, summary["trained_samples"]
                    rates[kind].append(summary["samples_per_s"])
                    log(f"run {i} {kind:>5}: {summary['samples_per_s']:,.0f} samples/s "
                        f"(data wait {100 * summary['data_wait_fraction']:.1f}%)")
        finally:
            feed.terminate()
            feed.wait(timeout=30)
    local, remote = statistics.median(rates["local"]), statistics.median(rates["feed"])
    return {"local_train_samples_per_s": local, "feed_train_samples_per_s": remote, "ratio": remote / local,
            "local_load_samples_per_s": local_load, "feed_load_samples_per_s": feed_load,
            "device": device, "rows": rows, "batch_size": batch_size, "repeats": repeats,
            "runs": rates}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--table-rows", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = compare(args.rows, table_rows=args.table_rows, batch_size=args.batch_size, repeats=args.repeats,
                  device=args.device, log=lambda line: print(line, file=sys.stderr))
    print(f"training from a feed over loopback: {out['feed_train_samples_per_s']:,.0f} samples/s vs "
          f"{out['local_train_samples_per_s']:,.0f} from the local cache = {out['ratio']:.2f}x "
          f"(loading alone: feed {out['feed_load_samples_per_s']:,.0f}, local {out['local_load_samples_per_s']:,.0f} "
          "samples/s)", file=sys.stderr)
    if args.json:
        print(orjson.dumps(out).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
