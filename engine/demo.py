"""``headrace demo``: the whole system on one machine, from nothing.

Starts the bundled Kafka-compatible broker, publishes a synthetic Criteo-shaped stream
(Zipf ids, planted click signal, a few malformed events to show dead letters), runs
``serve`` on it with live progress, and returns the summary once every event has been
read and the trainer has caught up (or ``max_seconds`` passed).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from engine.config import config_from_dict
from engine.progress import ProgressLine
from engine.serve import ServeStatus, serve
from streams.synthetic import SyntheticSpec, generate_payloads, synthetic_config_dict

__all__ = ["demo", "demo_config"]

log = logging.getLogger(__name__)
DEMO_TOPIC = "headrace-demo"


def demo_config(bootstrap: str, workdir: str, spec: SyntheticSpec, topic: str = DEMO_TOPIC):
    doc = synthetic_config_dict(spec, rows=spec.cardinality)
    doc["source"] = {"bootstrap": bootstrap, "topics": [topic], "max_batch_records": 2048}
    doc["cache"] = {"path": os.path.join(workdir, "cache")}
    doc["trainer"].update({
        "checkpoint_dir": os.path.join(workdir, "checkpoints"),
        "batch_size": 512, "learning_rate": 0.05, "checkpoint_every_batches": 200,
        "metrics_window": 20_000, "threads": 1,
    })
    return config_from_dict(doc, file="<demo>")


def _produce(bootstrap: str, topic: str, spec: SyntheticSpec, events: int, bad_fraction: float,
             rate_events_per_s: float | None, done: dict) -> None:
    from streams.producer import produce_values

    chunk = 8192
    t0 = time.monotonic()
    try:
        for start in range(0, events, chunk):
            n = min(chunk, events - start)
            done["sent"] = done.get("sent", 0) + produce_values(
                bootstrap, topic, generate_payloads(spec, n, start, bad_fraction=bad_fraction))
            if rate_events_per_s:
                ahead = (start + n) / rate_events_per_s - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
    except Exception as exc:  # reported by the supervisor loop, which stops the demo
        done["error"] = exc
        raise


def demo(
    *,
    events: int = 200_000,
    max_seconds: float = 600.0,
    partitions: int = 4,
    workdir: str | None = None,
    rate_events_per_s: float | None = None,
    bad_fraction: float = 0.001,
    progress: ProgressLine | None = None,
) -> dict:
    from streams.admin import create_topic
    from streams.broker import EmbeddedBroker

    workdir = workdir or tempfile.mkdtemp(prefix="headrace-demo-")
    # Event times start now and advance at the production rate (all "now" when producing as
    # fast as possible), so the summary's freshness is the real delay from event to training.
    interval_ms = int(1000 // rate_events_per_s) if rate_events_per_s else 0
    spec = SyntheticSpec(cardinality=20_000, start_time_ms=int(time.time() * 1000), event_interval_ms=interval_ms)
    with EmbeddedBroker() as broker:
        create_topic(broker.bootstrap, DEMO_TOPIC, partitions=partitions)
        cfg = demo_config(broker.bootstrap, workdir, spec)
        produced: dict = {}
        producer = threading.Thread(
            target=_produce, name="demo-producer", daemon=True,
            args=(broker.bootstrap, DEMO_TOPIC, spec, events, bad_fraction, rate_events_per_s, produced),
        )
        producer.start()
        caught_up_since: list[float] = []

        def until(s: ServeStatus) -> bool:
            if "error" in produced:
                return True
            if s.read < events:
                return False
            # Everything is cached; give the trainer time to train the tail of the stream.
            if not caught_up_since:
                caught_up_since.append(time.monotonic())
            lag = s.cached_rows - s.trained_samples
            return lag < cfg.trainer.batch_size * 2 or time.monotonic() - caught_up_since[0] > 30

        summary = serve(cfg, until=until, max_seconds=max_seconds, progress=progress)
        producer.join(timeout=30)
    if "error" in produced:
        raise produced["error"]
    summary["produced"] = produced.get("sent", 0)
    summary["workdir"] = workdir
    return summary
