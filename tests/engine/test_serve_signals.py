"""A planned stop looks like a planned stop however the signal arrives: SIGTERM or SIGINT,
to the supervisor alone or to its whole process group (systemd's ``KillMode=control-group``,
Ctrl-C in a terminal). Each way ``serve`` stops reading, flushes, checkpoints and exits 0,
and the next run resumes: every event cached once and trained once across all runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.batch_cache import BatchCache
from tests.engine_helpers import (
    cache_counts,
    headrace,
    last_json,
    produce_numbered,
    small_config_doc,
    wait_until,
    write_config,
)
from trainer.loop import READER_NAME

PARTITIONS = 2
PER_ROUND = 1500
PATTERNS = [(signal.SIGTERM, "group"), (signal.SIGINT, "supervisor"), (signal.SIGTERM, "supervisor"),
            (signal.SIGINT, "group")]


def _produce(bootstrap: str, topic: str, start: int, n: int) -> None:
    produce_numbered(bootstrap, topic, start, n, PARTITIONS)


def _start_serve(cfg: Path, log: Path) -> subprocess.Popen:
    # Its own session, so the test can signal the whole group as a service manager would.
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "engine", "serve", "-c", str(cfg), "--json"],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _trainer_position(cache_path: Path) -> int:
    try:
        with BatchCache(str(cache_path), readonly=True) as cache:
            return cache.reader_positions().get(READER_NAME, -1)
    except Exception:  # noqa: BLE001 - not created yet
        return -1


@pytest.mark.slow
def test_sigterm_and_sigint_to_group_or_supervisor_stop_cleanly_and_resume_exactly_once(broker, new_topic, tmp_path):
    topic = new_topic(partitions=PARTITIONS)
    doc = small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic)
    doc["trainer"].update({"checkpoint_every_batches": 3, "threads": 1})
    cfg = write_config(tmp_path, doc)
    cache_path, log = tmp_path / "cache", tmp_path / "serve.log"
    trained = 0
    for k, (sig, target) in enumerate(PATTERNS):
        _produce(broker.bootstrap, topic, k * PER_ROUND, PER_ROUND)
        before = _trainer_position(cache_path)
        proc = _start_serve(cfg, log)
        try:
            wait_until(lambda: cache_counts(cache_path)["read"] >= (k + 1) * PER_ROUND, 120,
                       f"round {k}: events cached", proc, log)
            # the trainer has checkpointed in this run, so it is mid-stream when the signal lands
            wait_until(lambda: _trainer_position(cache_path) > before, 120, f"round {k}: trainer progress", proc, log)
            if target == "group":
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        text = log.read_text()
        assert rc == 0, f"{sig.name} to the {target}: exit {rc}\n{text[-4000:]}"
        summary = last_json(text)
        assert summary["events"] == PER_ROUND, summary
        assert summary["checkpoint"] and Path(summary["checkpoint"]).exists(), summary
        newest = sorted((tmp_path / "cache-ckpt").glob("ckpt-*.pt"))[-1]
        assert newest == Path(summary["checkpoint"])  # the stop's own checkpoint
        trained += summary["trained_samples"]
        assert summary["total_trained_samples"] == trained

    # the rows still pending (a partial training batch) are trained by a bounded run
    res = headrace("train", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    tail = last_json(res.stdout)
    total = len(PATTERNS) * PER_ROUND
    assert trained + tail["trained_samples"] == tail["total_trained_samples"] == total

    seen: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
    with BatchCache(str(cache_path), readonly=True) as cache:
        for cached in cache.iter_batches():
            seen[cached.partition].extend(cached.batch.column("_offset").to_pylist())
        counts = cache.counts()
    for p in range(PARTITIONS):
        np.testing.assert_array_equal(np.sort(seen[p]), np.arange(total // PARTITIONS))  # each once
    assert (counts["read"], counts["cached_rows"]) == (total, total)


@pytest.mark.slow
def test_second_signal_stops_fast_and_nothing_is_lost(broker, new_topic, tmp_path):
    topic = new_topic(partitions=PARTITIONS)
    cfg = write_config(tmp_path, small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic))
    _produce(broker.bootstrap, topic, 0, 2000)
    cache_path, log = tmp_path / "cache", tmp_path / "serve.log"
    proc = _start_serve(cfg, log)
    try:
        wait_until(lambda: cache_counts(cache_path)["read"] >= 2000, 120, "events cached", proc, log)
        os.killpg(proc.pid, signal.SIGTERM)
        # (a second signal sent before the first is delivered merges with it: wait for the first)
        wait_until(lambda: "send it again" in log.read_text(), 30, "the first signal handled", proc, log)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 130, text[-4000:]
    assert "stopped fast" in text
    res = headrace("train", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    assert last_json(res.stdout)["total_trained_samples"] == 2000
    assert cache_counts(cache_path)["read"] == 2000
