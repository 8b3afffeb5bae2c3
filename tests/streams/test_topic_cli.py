"""``headrace topic create|list|describe`` and ``produce --create-topic`` on the bundled broker."""

from __future__ import annotations

import uuid

import pytest

from streams.synthetic import write_jsonl
from tests.engine_helpers import SMALL_SPEC, headrace, last_json, small_config_doc, write_config

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def test_topic_create_list_describe(broker):
    name = f"topic-cli-{uuid.uuid4().hex[:8]}"
    res = headrace("topic", "create", name, "--bootstrap", broker.bootstrap, "--partitions", "3",
                   "--config-entry", "retention.ms=3600000", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert last_json(res.stdout)["topics"] == [{"name": name, "created": True, "partitions": 3}]
    again = headrace("topic", "create", name, "--bootstrap", broker.bootstrap, "--partitions", "3", "--json")
    assert again.returncode == 0 and last_json(again.stdout)["topics"][0]["created"] is False
    clash = headrace("topic", "create", name, "--bootstrap", broker.bootstrap, "--partitions", "5")
    assert clash.returncode == 3 and "3 partition(s)" in clash.stderr

    listed = headrace("topic", "list", "--bootstrap", broker.bootstrap, "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert {"name": name, "partitions": 3, "internal": False} in last_json(listed.stdout)["topics"]

    desc = headrace("topic", "describe", name, "--bootstrap", broker.bootstrap, "--all-configs", "--json")
    assert desc.returncode == 0, desc.stderr[-2000:]
    (topic,) = last_json(desc.stdout)["topics"]
    assert topic["partitions"] == 3 and [p["partition"] for p in topic["partition_details"]] == [0, 1, 2]
    assert topic["configs"].get("retention.ms") == "3600000"
    text = headrace("topic", "describe", name, "--bootstrap", broker.bootstrap)
    assert text.returncode == 0 and "partition 2: leader" in text.stdout

    missing = headrace("topic", "describe", "no-such-topic-" + name, "--bootstrap", broker.bootstrap)
    assert missing.returncode == 3 and "does not exist" in missing.stderr


def test_produce_creates_a_missing_topic_when_asked(broker, tmp_path):
    name = f"produce-create-{uuid.uuid4().hex[:8]}"
    cfg = write_config(tmp_path, small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=name))
    events = tmp_path / "events.jsonl"
    write_jsonl(SMALL_SPEC, 50, str(events))
    plain = headrace("produce", "-c", str(cfg), "--from", str(events))
    assert plain.returncode == 3 and "headrace topic create" in plain.stderr
    wrong = headrace("produce", "-c", str(cfg), "--from", str(events), "--partitions", "2")
    assert wrong.returncode == 2 and "--create-topic" in wrong.stderr
    made = headrace("produce", "-c", str(cfg), "--from", str(events), "--create-topic", "--partitions", "2", "--json")
    assert made.returncode == 0, made.stderr[-2000:]
    assert last_json(made.stdout) == {"produced": 50, "topic": name}
    desc = headrace("topic", "describe", "-c", str(cfg), "--json")  # the config's [source] topics
    assert last_json(desc.stdout)["topics"][0]["partitions"] == 2
    more = headrace("produce", "-c", str(cfg), "--from", str(events), "--create-topic", "--json")  # exists: fine
    assert more.returncode == 0 and last_json(more.stdout)["produced"] == 50
