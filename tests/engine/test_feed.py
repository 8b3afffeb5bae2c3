"""``headrace feed`` over loopback: trainers reading Arrow Flight feeds train exactly what they
would train from the local cache, through a killed feed, a resumed trainer and two merged feeds."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine.config import config_from_dict
from engine.errors import ConfigError, FeedError, TrainerError, exit_code_of
from storage.batch_cache import BatchCache
from tests.engine_helpers import wait_until, write_config
from tests.storage.builders import make_pb
from trainer.feed_reader import FeedReader
from trainer.loop import ContinuousTrainer

# Feed subprocesses: deselect with -m 'not slow' for a quick run.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MAP_BYTES = 1 << 26
BATCH = 64
TOKEN_ENV = "HEADRACE_TEST_FEED_TOKEN"


def fill(path: Path, topic: str, sizes: list[int], start: int = 0) -> int:
    """Append one cached batch per size (rows numbered by offset from ``start``); returns the
    next offset."""
    with BatchCache(path, map_size_bytes=MAP_BYTES) as cache:
        for n in sizes:
            cache.write(make_pb(topic, 0, start, start + n))
            start += n
    return start


def train_cfg(tmp_path: Path, cache: Path, ckpt: str, **trainer):
    # make_pb rows: label, x (dense), cat (7 rows), tags (two rows per event, < 2100).
    return config_from_dict({
        "schema": {"dense": [{"name": "x"}],
                   "sparse": [{"name": "cat", "rows": 7}, {"name": "tags", "rows": 2100, "multi": True}]},
        "cache": {"path": str(cache), "map_size_bytes": MAP_BYTES},
        "trainer": {"embedding_dim": 4, "bottom_mlp": [8, 4], "top_mlp": [8], "batch_size": BATCH,
                    "learning_rate": 0.05, "checkpoint_dir": str(tmp_path / ckpt), "checkpoint_every_batches": 4,
                    "prefetch_batches": 2, "device": "cpu", "feed_retry_s": 30.0, **trainer},
    })


class Feed:
    """``headrace feed`` on a cache, as a subprocess on loopback."""

    def __init__(self, tmp_path: Path, cache: Path, *extra: str, port: int = 0, env: dict | None = None,
                 host: str = "127.0.0.1", netns: str | None = None):
        self.cfg = write_config(tmp_path, {"cache": {"path": str(cache), "map_size_bytes": MAP_BYTES}},
                                name=f"feed-{cache.name}.toml")
        self.args, self.env, self.log = extra, env, tmp_path / f"feed-{cache.name}.log"
        self.host, self.prefix = host, ["ip", "netns", "exec", netns] if netns else []
        self.start(port)

    def start(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "engine", "feed", "-c", str(self.cfg),
             "--listen", f"{self.host}:{port}", "--json", *self.args],
            stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True, env={**os.environ, **(self.env or {})})
        line = self.proc.stdout.readline()
        assert line, f"feed exited ({self.proc.wait()}):\n{self.log.read_text()[-3000:]}"
        self.url = json.loads(line)["feed"]
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def model_of(checkpoint: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(checkpoint, weights_only=True)["model"].items() if torch.is_tensor(v)}


def assert_same_model(checkpoint: str, ref: str) -> None:
    a, b = model_of(checkpoint), model_of(ref)
    assert a.keys() == b.keys() and any(k.startswith("embeddings.") for k in a)
    for name in a:
        diff = (a[name].double() - b[name].double()).abs().max().item()
        assert diff <= 1e-6, f"{name} differs by {diff}"


@pytest.fixture(scope="module")
def feeds(tmp_path_factory):
    """Two static caches (topic a: 20 batches of 50 rows; topic b: 8 of 40) and their feeds."""
    tmp = tmp_path_factory.mktemp("feeds")
    fill(tmp / "cache-a", "a", [50] * 20)
    fill(tmp / "cache-b", "b", [40] * 8)
    a, b = Feed(tmp, tmp / "cache-a"), Feed(tmp, tmp / "cache-b")
    yield tmp, a, b
    a.stop(), b.stop()


def test_training_from_a_feed_equals_training_from_the_local_cache(feeds, tmp_path):
    tmp, a, _ = feeds
    cache = tmp / "cache-a"
    offsets = [o for cb in FeedReader([a.url]).iter_batches(0) for o in cb.batch.column("_offset").to_pylist()]
    assert offsets == list(range(1000))  # every row once, in cache order
    local = ContinuousTrainer(train_cfg(tmp_path, cache, "local")).run()
    remote = ContinuousTrainer(train_cfg(tmp_path, tmp_path / "no-local-cache", "feed", feeds=[a.url])).run()
    assert remote["trained_samples"] == local["trained_samples"] == 1000
    assert remote["stop_reason"] == "end_of_cache"
    assert_same_model(remote["checkpoint"], local["checkpoint"])
    with BatchCache(cache, readonly=True) as c:  # retention on the feed's host keeps what a resume needs
        assert c.reader_positions()["feed:trainer"] == 19  # the checkpoint's cursor is in batch 19
    assert a.proc.poll() is None


def test_two_feeds_merge_round_robin_and_a_resumed_trainer_trains_each_row_once(feeds, tmp_path):
    tmp, a, b = feeds
    merged = [(cb.seq, cb.topic, cb.start_offset) for cb in FeedReader([a.url, b.url]).iter_batches(0)]
    expected = [x for i in range(8) for x in (("a", 50 * i), ("b", 40 * i))] + [("a", 50 * i) for i in range(8, 20)]
    assert merged == [(m, *e) for m, e in enumerate(expected)]  # b runs out, a goes on
    both = [a.url, b.url]
    whole = ContinuousTrainer(train_cfg(tmp_path, tmp / "cache-a", "whole", feeds=both)).run()
    first = ContinuousTrainer(train_cfg(tmp_path, tmp / "cache-a", "parts", feeds=both), max_batches=5).run()
    rest = ContinuousTrainer(train_cfg(tmp_path, tmp / "cache-a", "parts", feeds=both)).run()
    assert whole["trained_samples"] == first["trained_samples"] + rest["trained_samples"] == 1320
    assert rest["resumed_from"] is not None
    assert_same_model(rest["checkpoint"], whole["checkpoint"])
    swapped = ContinuousTrainer(train_cfg(tmp_path, tmp / "cache-a", "parts", feeds=[b.url, a.url]))
    with pytest.raises(TrainerError, match="same feeds in the same order"):
        swapped.run()


def test_feed_killed_mid_stream_and_restarted_the_trainer_resumes_exactly(tmp_path, caplog):
    cache = tmp_path / "cache"
    next_offset = fill(cache, "t", [50] * 10)  # 500 rows: 7 batches of 64 and 52 rows pending
    feed = Feed(tmp_path, cache)
    trained = {"samples": 0}
    stop = threading.Event()
    trainer = ContinuousTrainer(train_cfg(tmp_path, tmp_path / "none", "follow", feeds=[feed.url]), follow=True,
                                stop=stop, progress_every_batches=1,
                                on_progress=lambda s: trained.update(samples=s["total_trained_samples"]))
    result = {}
    thread = threading.Thread(target=lambda: result.update(trainer.run()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: trained["samples"] == 448, 60, "the trainer to train the first 448 rows")
        caplog.set_level(logging.WARNING, logger="trainer.feed_client")
        feed.kill()  # while the follow stream is open and 52 rows wait for their batch
        fill(cache, "t", [50] * 10 + [24], start=next_offset)  # 1024 rows in all: 16 batches
        feed.start(feed.port)
        wait_until(lambda: trained["samples"] == 1024, 60, "the trainer to train every row after the restart")
    finally:
        stop.set()
        thread.join(60)
        feed.stop()
    assert result["total_trained_samples"] == 1024 and result["stop_reason"] == "stopped"
    assert "retrying" in caplog.text  # the stream broke and was resumed, not merely waited on
    local = ContinuousTrainer(train_cfg(tmp_path, cache, "local")).run()
    assert local["trained_samples"] == 1024
    assert_same_model(result["checkpoint"], local["checkpoint"])


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls_feed_rejects_a_wrong_token_and_serves_the_right_one(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fill(cache, "t", [10, 10])
    cert, key = self_signed(tmp_path)
    feed = Feed(tmp_path, cache, "--token-env", TOKEN_ENV, "--tls-cert", str(cert), "--tls-key", str(key),
                env={TOKEN_ENV: "right"})
    assert feed.url.startswith("grpc+tls://")
    ca = cert.read_bytes()
    try:
        for token in ("wrong", None):
            with pytest.raises(FeedError, match="rejected the trainer's token") as info:
                list(FeedReader([feed.url], token=token, tls_root_certs=ca, retry_s=5).iter_batches(0))
            assert not info.value.retriable
        reader = FeedReader([feed.url], token="right", tls_root_certs=ca)
        assert [cb.num_rows for cb in reader.iter_batches(0)] == [10, 10]
        monkeypatch.setenv(TOKEN_ENV, "right")  # the trainer reads it from [trainer] feed_token_env
        summary = ContinuousTrainer(train_cfg(tmp_path, cache, "ck", feeds=[feed.url], feed_token_env=TOKEN_ENV,
                                              feed_tls_root_certs=str(cert), batch_size=5)).run()
        assert summary["trained_samples"] == 20
    finally:
        assert feed.stop()["streams"] >= 2


def test_an_unreachable_feed_fails_clearly_after_its_retries(tmp_path):
    with pytest.raises(FeedError, match=r"grpc://127.0.0.1:1 unreachable") as info:
        list(FeedReader(["grpc://127.0.0.1:1"], retry_s=0.3).iter_batches(0))
    assert info.value.retriable and exit_code_of(info.value) == 3
    with pytest.raises(ConfigError, match="not a feed URL"):
        train_cfg(tmp_path, tmp_path / "c", "ck", feeds=["http://127.0.0.1:8815"])
    with pytest.raises(ConfigError, match="max_batch_wait_ms"):
        train_cfg(tmp_path, tmp_path / "c", "ck", feeds=["grpc://127.0.0.1:8815"], max_batch_wait_ms=50)


class Hosts:
    """Network namespaces standing for ingest hosts, each joined to this (the trainer's)
    namespace by its own veth link: a feed listening on a host's address is reachable only
    over that link."""

    def __init__(self):
        self.names: list[str] = []
        self._net = 200 + os.getpid() % 50  # 10.<net>.<i>.0/30 per host

    def add(self) -> tuple[str, str]:
        i = len(self.names) + 1
        name = f"hr{os.getpid()}h{i}"
        self.names.append(name)
        here, there = f"hrv{os.getpid() % 100000}a{i}", f"hrv{os.getpid() % 100000}b{i}"
        ip = f"10.{self._net}.{i}"
        for cmd in (["netns", "add", name], ["link", "add", here, "type", "veth", "peer", "name", there],
                    ["link", "set", there, "netns", name], ["addr", "add", f"{ip}.1/30", "dev", here],
                    ["link", "set", here, "up"], ["-n", name, "addr", "add", f"{ip}.2/30", "dev", there],
                    ["-n", name, "link", "set", there, "up"], ["-n", name, "link", "set", "lo", "up"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True, text=True)
        return name, f"{ip}.2"

    def remove(self) -> None:
        for name in self.names:  # deleting a namespace deletes its veth pair too
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def netns_unavailable() -> str | None:
    """Why this test cannot make network namespaces here (None: it can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"hr{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()} (needs root or CAP_SYS_ADMIN + CAP_NET_ADMIN)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def test_two_ingest_hosts_in_network_namespaces_feed_one_trainer(tmp_path):
    why = netns_unavailable()
    if why:
        pytest.skip(f"cannot create network namespaces: {why}")
    hosts, feeds = Hosts(), []
    try:
        # Host A ingested partitions 0 and 2, host B partition 1, each into its own cache.
        fill(tmp_path / "cache-a", "ev", [30] * 4)
        with BatchCache(tmp_path / "cache-a", map_size_bytes=MAP_BYTES) as cache:
            for k in range(3):
                cache.write(make_pb("ev", 2, 30 * k, 30 * k + 30))
        with BatchCache(tmp_path / "cache-b", map_size_bytes=MAP_BYTES) as cache:
            for k in range(5):
                cache.write(make_pb("ev", 1, 25 * k, 25 * k + 25))
        for cache in ("cache-a", "cache-b"):
            name, address = hosts.add()
            feeds.append(Feed(tmp_path, tmp_path / cache, host=address, netns=name))
        urls = [f.url for f in feeds]
        assert all(not u.startswith("grpc://127.") for u in urls)
        seen = [(cb.partition, o) for cb in FeedReader(urls).iter_batches(0)
                for o in cb.batch.column("_offset").to_pylist()]
        expected = {(0, o) for o in range(120)} | {(2, o) for o in range(90)} | {(1, o) for o in range(125)}
        assert len(seen) == len(expected) and set(seen) == expected  # every event once
        summary = ContinuousTrainer(train_cfg(tmp_path, tmp_path / "none", "ck", feeds=urls)).run()
        assert summary["trained_samples"] == len(expected)
    finally:
        for f in feeds:
            f.stop()
        hosts.remove()
