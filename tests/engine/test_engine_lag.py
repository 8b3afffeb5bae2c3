"""serve's lag monitor: broker high watermarks minus the cache's offsets, and the cache's
offsets committed to the consumer group for outside lag monitors."""

from __future__ import annotations

import pytest

from engine.config import replace_in
from engine.lag import LagMonitor
from storage.batch_cache import BatchCache
from streams.group_offsets import committed_group_offsets
from streams.kafka_client import watermark_offsets
from streams.producer import produce_values
from tests.engine_helpers import small_config
from tests.storage.builders import make_pb

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def test_lag_and_group_commit(broker, new_topic, tmp_path):
    topic = new_topic(partitions=2)
    for p in (0, 1):
        for _ in range(5):  # several small batches: Tansu reports the end exactly after this
            produce_values(broker.bootstrap, topic, [b'{"label": 1}'] * 4, partition=p)
    cfg = small_config(tmp_path, bootstrap=broker.bootstrap, topic=topic)
    cfg = replace_in(cfg, "source", group_id=f"lag-{topic}")
    marks = watermark_offsets(cfg.source, topic, [0, 1])
    with BatchCache.from_config(cfg.cache) as cache:
        monitor = LagMonitor(cfg, cache)
        empty_lag = monitor.measure()
        assert empty_lag == sum(high - low for low, high in marks.values()) > 0
        cache.write(make_pb(topic, 0, 0, 7))
        assert monitor.measure() == empty_lag - 7
        committed = committed_group_offsets(cfg.source, [(topic, 0), (topic, 1)])
        assert committed[(topic, 0)] == 7  # informational copy of the cache's offset
        assert committed[(topic, 1)] is None  # nothing cached for partition 1 yet
