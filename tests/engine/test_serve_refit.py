"""Online re-fit through serve: the supervisor fits a learned mapping mid-stream, the
pipeline stamps later batches with the new version, and the trainer migrates rows when it
crosses the version boundary and carries on."""

from __future__ import annotations

import signal
import time

import pytest

from storage.batch_cache import BatchCache
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


def _versions(cache_path) -> set[int]:
    with BatchCache(str(cache_path), readonly=True) as cache:
        return {int(v) for v in cache.stat()["mapping_versions"]}


@pytest.mark.slow
def test_serve_refits_and_the_trainer_crosses_the_version_boundary(broker, new_topic, tmp_path):
    topic = new_topic(partitions=1)
    doc = small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic,
                           hash={"refit_every_s": 3.0, "min_events_to_fit": 1000, "fit": "learned"})
    cfg = write_config(tmp_path, doc)
    cache_path = tmp_path / "cache"
    produce_values(broker.bootstrap, topic, generate_payloads(SMALL_SPEC, 4000))
    log = tmp_path / "serve.log"
    proc = start_headrace("serve", "--no-train", "-c", str(cfg), "--json", log_path=log)
    wait_until(lambda: cache_counts(cache_path)["read"] >= 4000, 120, "first events cached", proc, log)
    # Keep events coming until the pipeline writes batches with a fitted mapping version.
    sent, deadline = 4000, time.monotonic() + 120
    while not any(v >= 1 for v in _versions(cache_path)):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        produce_values(broker.bootstrap, topic, generate_payloads(SMALL_SPEC, 500, sent))
        sent += 500
        wait_until(lambda: cache_counts(cache_path)["read"] >= sent, 60, f"{sent} events", proc, log)
    assert stop(proc, signal.SIGTERM) == 0, log.read_text()[-4000:]
    summary = last_json(log.read_text())
    assert summary["mapping_refits"], summary
    assert 0 in _versions(cache_path)

    # The trainer reads version-0 batches, then migrates rows at the first fitted batch.
    res = headrace("train", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    trained = last_json(res.stdout)
    assert trained["trained_samples"] >= 0.95 * sent
    assert trained["mapping_version"] == max(_versions(cache_path))
    assert trained["logloss"] < 0.65, trained  # no blow-up across the boundary (base rate ~0.56)
