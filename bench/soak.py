"""Soak: ``headrace serve`` with its trainer on the bundled broker under a steady outside
producer for ``--minutes``, watched every ``--sample-s`` seconds: anonymous RSS of every
process of the service (``RssAnon`` in ``/proc/PID/status``: heap, not LMDB's file-backed
pages), cache bytes on disk, consumer lag, freshness (trainer-reported p99; event-time lag
of the cache when the trainer has not reported yet) and ingest rate.

The producer is a separate process using a plain Kafka client (librdkafka's, else
kafka-python: an outside client) at
``--rate`` events/s; event time is the Kafka record timestamp, so freshness is "trained at"
minus "produced at". After the producing window the bench waits for the service to drain
(everything produced cached and trained: ``[trainer] max_batch_wait_ms`` trains the last
partial batch), then stops it with SIGTERM. CI does not run it.

    python bench/soak.py [--minutes 10] [--rate 3000] [--json]

The baseline beside the figure is the start of the same run: ``rss_anon_mb_start`` (after
a warm-up of a quarter of the run) against ``rss_anon_mb_end``, and their least-squares
slope in MB/h; ``lag_max`` (events produced so far minus events read: the bundled broker
under-reports end offsets, so the service's own lag, ``broker_lag_max``, reads low) and ``freshness_p99_s`` (the worst of the trainer's windowed p99)
are over the same steady part (``lag_max_with_startup`` includes the backlog of the start).
With ``--json`` the last line is ``{"minutes", "events", "trained", "rss_anon_mb_start",
"rss_anon_mb_end", "rss_anon_slope_mb_per_h", "lag_max", "freshness_p99_s", ...}``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

PARTITIONS = 2
_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the outside producer

def produce_main(bootstrap: str, topic: str, rate: float, seconds: float, count_path: str) -> None:
    """Send synthetic events at ``rate``/s for ``seconds`` with a plain Kafka client (no
    headrace client code); write the number the broker acknowledged to ``count_path`` (also
    every second, so a crash of the producer still leaves a count).

    The client is librdkafka's (``confluent-kafka``) when installed: kafka-python needs
    ~250 us of CPU per message, so at 3,000 events/s the outside producer alone took 80%
    of one of this machine's two cores and starved the service it was measuring."""
    from streams.synthetic import SyntheticSpec, generate_payloads

    payloads = generate_payloads(SyntheticSpec(), 50_000)
    acked = [0]
    try:
        import confluent_kafka as ck
    except ImportError:
        ck = None
    if ck is not None:
        producer = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": 1})

        def on_delivery(err, _msg):
            if err is None:
                acked[0] += 1

        def send(i: int) -> None:
            while True:
                try:
                    producer.produce(topic, payloads[i % len(payloads)], partition=i % PARTITIONS,
                                     on_delivery=on_delivery)
                    return
                except BufferError:  # the client's queue is full: let it drain
                    producer.poll(0.01)

        serve_callbacks, finish = (lambda: producer.poll(0)), (lambda: producer.flush())
    else:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1)

        def send(i: int) -> None:
            producer.send(topic, payloads[i % len(payloads)], partition=i % PARTITIONS).add_callback(
                lambda _md: acked.__setitem__(0, acked[0] + 1))

        serve_callbacks, finish = (lambda: None), (lambda: (producer.flush(), producer.close()))
    sent, t0, last_write = 0, time.monotonic(), 0.0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        due = int((now - t0) * rate)
        while sent < due:
            send(sent)
            sent += 1
        serve_callbacks()
        if now - last_write >= 1.0:
            Path(count_path).write_text(str(acked[0]))
            last_write = now
        time.sleep(0.005)
    finish()
    Path(count_path).write_text(str(acked[0]))


# ------------------------------------------------------------------ measuring

def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _rss_anon_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _pid_names(pids: dict) -> dict[int, str]:
    """``serve``'s status ``pids`` as {pid: name}; ``pipelines`` names each pipeline worker."""
    names = {v: k for k, v in pids.items() if isinstance(v, int)}
    names.update({v: k for k, v in (pids.get("pipelines") or {}).items() if isinstance(v, int)})
    return names


def _label(pid: int, names: dict[int, str]) -> str:
    if pid in names:
        return names[pid]
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"pid {pid}"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    return f"pid {pid}"


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def _read_json(path: Path) -> dict:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}


def _produced(count_path: Path) -> int:
    try:
        return int(count_path.read_text() or 0)
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return 0


def _event_time_lag_s(cache_path: Path) -> float | None:
    from storage.batch_cache import BatchCache

    try:
        with BatchCache(str(cache_path), readonly=True) as cache:
            span = cache.stat().get("event_time")
    except Exception:  # noqa: BLE001 - not created yet
        return None
    return None if not span else time.time() - span[1] / 1000.0


def slope_per_h(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``ts`` (seconds), per hour."""
    if len(ts) < 2 or max(ts) == min(ts):
        return 0.0
    return float(np.polyfit(np.asarray(ts), np.asarray(ys), 1)[0] * 3600.0)


# ------------------------------------------------------------------ the run

def _config(workdir: Path, bootstrap: str, topic: str, args) -> Path:
    from streams.synthetic import SyntheticSpec, synthetic_config_dict
    from tests.engine_helpers import write_config

    doc = synthetic_config_dict(SyntheticSpec(), rows=100_000)
    doc["schema"]["event_time"] = ""  # the Kafka record timestamp: freshness from production time
    doc["source"] = {"bootstrap": bootstrap, "topics": [topic], "max_batch_records": 4096}
    doc["cache"] = {"path": str(workdir / "cache"), "max_bytes": args.cache_max_bytes}
    doc["trainer"].update({"checkpoint_dir": str(workdir / "checkpoints"), "batch_size": 512,
                           "checkpoint_every_batches": 200, "threads": args.trainer_threads,
                           "max_batch_wait_ms": args.max_batch_wait_ms, "device": args.device})
    return write_config(workdir, doc, "soak.toml")


def run(args) -> dict:
    from streams.admin import create_topic
    from streams.broker import EmbeddedBroker

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="headrace-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60.0
    with EmbeddedBroker() as broker:
        topic = "soak"
        create_topic(broker.bootstrap, topic, partitions=PARTITIONS)
        cfg = _config(workdir, broker.bootstrap, topic, args)
        status_path, count_path, log_path = workdir / "status.json", workdir / "produced", workdir / "serve.log"
        with open(log_path, "ab") as log:
            serve = subprocess.Popen([sys.executable, "-m", "engine", "serve", "-c", str(cfg), "--json",
                                      "--status-file", str(status_path)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=_ROOT, start_new_session=True)
        print(f"soak: serve pid {serve.pid}, workdir {workdir}; waiting for it to start...", file=sys.stderr)
        deadline = time.monotonic() + 300
        while not _read_json(status_path).get("pids"):
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        producer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--produce", broker.bootstrap,
                                     topic, str(args.rate), str(seconds), str(count_path)], cwd=_ROOT)
        samples = []
        t0 = time.monotonic()
        last_read, last_t = _read_json(status_path).get("read", 0), t0
        try:
            while True:
                time.sleep(args.sample_s)
                now = time.monotonic()
                st = _read_json(status_path)
                names = _pid_names(st.get("pids") or {})
                rss = {_label(p, names): _rss_anon_mb(p) for p in _tree(serve.pid)}
                rss = {k: v for k, v in rss.items() if v is not None}
                trainer = st.get("trainer") or {}
                freshness = trainer.get("freshness_p99_s")
                sample = {
                    "t_s": now - t0, "rss_anon_mb": rss, "rss_anon_mb_total": sum(rss.values()),
                    "cache_bytes": _dir_bytes(workdir / "cache"), "broker_lag": st.get("lag"),
                    # produced so far minus read: the true lag (the bundled broker under-reports
                    # end offsets after multi-record batches, so the service's own lag is low)
                    "lag": max(0, _produced(count_path) - st.get("read", 0)),
                    "freshness_p99_s": freshness,
                    "event_time_lag_s": None if freshness is not None else _event_time_lag_s(workdir / "cache"),
                    "events_per_s": (st.get("read", 0) - last_read) / (now - last_t),
                    "read": st.get("read", 0), "trained": st.get("trained_samples", 0),
                    "ingest_paused": bool((st.get("disk") or {}).get("paused")),
                }
                last_read, last_t = st.get("read", 0), now
                samples.append(sample)
                print(f"soak {sample['t_s']:6.0f}s: rss_anon {sample['rss_anon_mb_total']:7.1f} MB "
                      f"({', '.join(f'{k} {v:.0f}' for k, v in sorted(rss.items()))}) | cache "
                      f"{sample['cache_bytes'] / 2**20:7.1f} MiB | lag {sample['lag']} | fresh p99 "
                      f"{freshness if freshness is None else round(freshness, 2)} s | "
                      f"{sample['events_per_s']:,.0f} ev/s | read {sample['read']:,} trained {sample['trained']:,}",
                      file=sys.stderr)
                if serve.poll() is not None:
                    raise SystemExit(f"serve exited ({serve.returncode}):\n{log_path.read_text()[-3000:]}")
                if producer.poll() is not None:
                    produced = int(count_path.read_text())
                    drained = st.get("read", 0) >= produced and st.get("trained_samples", 0) >= produced
                    if drained or now - t0 > seconds + args.drain_s:
                        break
        finally:
            if producer.poll() is None:
                producer.kill()
            if serve.poll() is None:
                os.kill(serve.pid, signal.SIGTERM)
            rc = serve.wait(timeout=300)
        produced = int(count_path.read_text())
        summary = orjson.loads(log_path.read_text().strip().splitlines()[-1]) if rc == 0 else {}
    if rc != 0:
        raise SystemExit(f"serve exited {rc} on SIGTERM:\n{log_path.read_text()[-3000:]}")
    warm = max(1, len(samples) // 4)  # startup (imports, first checkpoint, page cache) is not drift
    steady = [s for s in samples[warm:] if s["t_s"] <= seconds] or samples[warm:] or samples
    ts, ys = [s["t_s"] for s in steady], [s["rss_anon_mb_total"] for s in steady]
    # Lag and freshness of the steady state (startup: the backlog produced while serve started).
    fresh = [s["freshness_p99_s"] for s in steady if s["freshness_p99_s"] is not None]
    lags = [s["lag"] for s in steady if s["lag"] is not None]
    per_process = sorted({k for s in steady for k in s["rss_anon_mb"]})
    return {
        "minutes": args.minutes,
        "events": produced,
        "trained": int(summary.get("total_trained_samples") or steady[-1]["trained"]),
        "rss_anon_mb_start": ys[0],
        "rss_anon_mb_end": ys[-1],
        "rss_anon_slope_mb_per_h": slope_per_h(ts, ys),
        "lag_max": max(lags) if lags else None,
        # the trainer's p99 over its last metrics_window rows, the worst of the steady samples
        "freshness_p99_s": max(fresh) if fresh else None,
        "lag_max_with_startup": max((s["lag"] for s in samples if s["lag"] is not None), default=None),
        "broker_lag_max": max((s["broker_lag"] for s in steady if s["broker_lag"] is not None), default=None),
        "event_time_lag_max_s": max((s["event_time_lag_s"] for s in samples if s["event_time_lag_s"] is not None),
                                    default=None),
        "rss_anon_slope_mb_per_h_by_process": {
            k: slope_per_h([s["t_s"] for s in steady if k in s["rss_anon_mb"]],
                           [s["rss_anon_mb"][k] for s in steady if k in s["rss_anon_mb"]]) for k in per_process},
        "rss_anon_mb_end_by_process": steady[-1]["rss_anon_mb"],
        "cache_bytes_max": max(s["cache_bytes"] for s in samples),
        "events_per_s": float(np.mean([s["events_per_s"] for s in steady])),
        "rate": args.rate,
        "samples": len(samples),
        "serve_summary": {k: summary.get(k) for k in ("events", "trained_samples", "auc", "logloss", "lag")},
        "workdir": str(workdir),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--produce":
        bootstrap, topic, rate, seconds, count_path = argv[1:6]
        produce_main(bootstrap, topic, float(rate), float(seconds), count_path)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=3000.0, help="events/s the outside producer sends")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--drain-s", type=float, default=120.0, help="after producing: how long to wait for the "
                    "service to cache and train everything")
    ap.add_argument("--max-batch-wait-ms", type=int, default=1000)
    ap.add_argument("--cache-max-bytes", type=int, default=512 << 20)
    ap.add_argument("--trainer-threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = run(args)
    print(f"soak: {result['events']:,} events, {result['trained']:,} trained in {args.minutes:g} min; "
          f"anonymous RSS {result['rss_anon_mb_start']:.0f} -> {result['rss_anon_mb_end']:.0f} MB "
          f"({result['rss_anon_slope_mb_per_h']:+.1f} MB/h); lag max {result['lag_max']}; "
          f"freshness p99 {result['freshness_p99_s']} s", file=sys.stderr)
    if args.json:
        print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
