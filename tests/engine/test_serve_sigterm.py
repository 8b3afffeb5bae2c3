"""SIGTERM to serve with its trainer: stop reading, flush, checkpoint, exit 0; the next
train run resumes from that checkpoint."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from engine.serving import load_model

from streams.producer import produce_values
from streams.synthetic import generate_payloads
from tests.engine_helpers import (
    SMALL_SPEC,
    cache_counts,
    headrace,
    last_json,
    small_config_doc,
    start_headrace,
    stop,
    wait_until,
    write_config,
)

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def test_sigterm_checkpoints_and_train_resumes(broker, new_topic, tmp_path):
    topic = new_topic(partitions=2)
    payloads = generate_payloads(SMALL_SPEC, 3000)
    produce_values(broker.bootstrap, topic, payloads)
    doc = small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic)
    # serve also exports the model on a schedule while it trains ([export] every_s)
    doc["trainer"]["checkpoint_every_batches"] = 2
    doc["export"] = {"dir": str(tmp_path / "exports"), "every_s": 0.2, "program": False}
    cfg = write_config(tmp_path, doc)
    log = tmp_path / "serve.log"
    proc = start_headrace("serve", "-c", str(cfg), "--json", log_path=log)
    wait_until(lambda: cache_counts(tmp_path / "cache")["read"] >= 3000, 120, "events cached", proc, log)
    wait_until(lambda: any((tmp_path / "exports").glob("pkg-*")), 120, "a scheduled export", proc, log)
    assert stop(proc, signal.SIGTERM) == 0, log.read_text()[-4000:]
    summary = last_json(log.read_text())
    assert summary["events"] == 3000 and summary["cached_rows"] == 3000
    checkpoints = sorted((tmp_path / "cache-ckpt").glob("ckpt-*.pt"))
    assert checkpoints, "serve's trainer wrote no checkpoint on SIGTERM"
    assert summary["exports"], summary  # packages written while training, each loadable
    model = load_model(summary["exports"][-1])
    scores = model.predict(payloads[:64])
    assert scores.shape == (64,) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()

    res = headrace("train", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    resumed = last_json(res.stdout)
    assert resumed["resumed_from"] is not None
    # everything cached is trained exactly once across the two runs
    assert summary["trained_samples"] + resumed["trained_samples"] == 3000
