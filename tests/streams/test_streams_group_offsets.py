"""Informational group commits round-trip through the broker with both clients."""

from __future__ import annotations

import pytest

from engine.config import KafkaClientKind, SourceConfig
from streams.group_offsets import commit_group_offsets, committed_group_offsets

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

CLIENTS = [KafkaClientKind.KAFKA_PYTHON, pytest.param(KafkaClientKind.CONFLUENT, id="confluent")]


@pytest.mark.parametrize("client", CLIENTS)
def test_commit_and_read_back(broker, new_topic, client):
    topic = new_topic(2)
    cfg = SourceConfig(bootstrap=broker.bootstrap, topics=(topic,), client=client, group_id=f"g-{topic}")
    assert committed_group_offsets(cfg, [(topic, 0), (topic, 1)]) == {(topic, 0): None, (topic, 1): None}
    commit_group_offsets(cfg, {(topic, 0): 17, (topic, 1): 4})
    commit_group_offsets(cfg, {(topic, 0): 20})
    assert committed_group_offsets(cfg, [(topic, 0), (topic, 1)]) == {(topic, 0): 20, (topic, 1): 4}
