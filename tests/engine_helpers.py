"""Shared helpers for the engine's end-to-end tests: configs, CLI subprocesses, cache reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow as pa

from engine.config import config_from_dict
from engine.errors import CacheError
from storage.batch_cache import BatchCache
from streams.synthetic import SyntheticSpec, synthetic_config_dict

SMALL_SPEC = SyntheticSpec(num_dense=4, num_sparse=5, cardinality=500, informative_sparse=3, informative_dense=2)


def produce_numbered(bootstrap: str, topic: str, start: int, n: int, partitions: int) -> None:
    """Events ``start .. start + n - 1`` (event i on partition ``i % partitions``, its fields
    derived from i) sent by a plain kafka-python producer, no headrace code: the 'outside
    client'."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    for i in range(start, start + n):
        event = {"label": i % 2, "i1": i, "i2": 1, "i3": 2, "i4": 3, "c1": f"u{i}", "c2": "a",
                 "c3": "b", "c4": "c", "c5": "d", "ts": 1_767_225_600_000 + i}
        producer.send(topic, orjson.dumps(event), partition=i % partitions)
    producer.flush()
    producer.close()


def write_config(tmp_path: Path, doc: dict, name: str = "config.toml") -> Path:
    """Write a config document as TOML (tiny writer: tables of scalars, lists, inline tables)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return orjson.dumps(v).decode()
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(v)

    lines = []
    for section, body in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items()]
        lines.append("")
    path = tmp_path / name
    path.write_text("\n".join(lines))
    return path


def small_config_doc(tmp_path: Path, *, bootstrap: str = "127.0.0.1:9", topic: str = "t", spec: SyntheticSpec = SMALL_SPEC,
                     cache: str = "cache", **sections) -> dict:
    doc = synthetic_config_dict(spec, rows=spec.cardinality, embedding_dim=8)
    doc["source"] = {"bootstrap": bootstrap, "topics": [topic], "max_batch_records": 256, "poll_timeout_ms": 100}
    doc["cache"] = {"path": str(tmp_path / cache)}
    doc["trainer"].update({"checkpoint_dir": str(tmp_path / (cache + "-ckpt")), "batch_size": 128,
                           "bottom_mlp": [16, 8], "top_mlp": [16], "checkpoint_every_batches": 20})
    for name, body in sections.items():
        doc.setdefault(name, {}).update(body)
    return doc


def small_config(tmp_path: Path, **kw):
    return config_from_dict(small_config_doc(tmp_path, **kw))


def headrace(*args: str, timeout_s: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (python -m engine), capturing output."""
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=os.getcwd(), **kw)


def http_get(address: str, path: str, timeout_s: float = 10) -> tuple[int, bytes]:
    """(status, body) of GET http://address/path; HTTP errors are answers, not exceptions."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def last_json(stdout: str) -> dict:
    return orjson.loads(stdout.strip().splitlines()[-1])


def start_headrace(*args: str, log_path: Path) -> subprocess.Popen:
    fh = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "engine", *args], stdout=fh, stderr=subprocess.STDOUT)


def cache_counts(cache_path: str | Path) -> dict:
    """The cache's counters; zeros while the service has not initialised it yet."""
    empty = {"read": 0, "cached_rows": 0, "filtered": 0, "dead_letters": 0}
    if not Path(cache_path).exists():
        return empty
    try:
        with BatchCache(str(cache_path), readonly=True) as cache:
            return cache.counts()
    except CacheError as exc:
        if exc.retriable:  # the directory exists but the writer has not created the cache yet
            return empty
        raise


def wait_until(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log_path: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}:\n"
                                 + (log_path.read_text()[-4000:] if log_path else ""))
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}"
                         + ("\n" + log_path.read_text()[-4000:] if log_path else ""))


def cached_table(cache_path: str | Path) -> list[tuple[str, int, pa.RecordBatch]]:
    with BatchCache(str(cache_path), readonly=True) as cache:
        return [(b.topic, b.partition, b.batch) for b in cache.iter_batches()]


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout_s: float = 60) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout_s)


def fill_synthetic_cache(cfg, rows: int, *, first_offset: int = 0, batch_rows: int = 500) -> None:
    """Cache ``rows`` synthetic rows (``SMALL_SPEC``, offsets from ``first_offset``) shaped like
    the pipeline's output, with ``bench/trainer.py``'s filler: a trainer to train, no broker."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "trainer.py"
    spec = importlib.util.spec_from_file_location("bench_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.fill_cache(cfg, SMALL_SPEC, rows, batch_rows=batch_rows, first_offset=first_offset)
