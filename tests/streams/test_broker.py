"""The embedded broker: readiness, stop, failures that must raise with the log, not hang."""

from __future__ import annotations

import socket

import pytest

from engine.errors import BrokerError
from streams.admin import create_topic, describe_brokers, list_partitions, list_topics
from streams.broker import EmbeddedBroker
from streams.errors import SourceError

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def test_session_broker_advertises_its_address(broker):
    port = broker.bootstrap.rsplit(":", 1)[1]
    brokers = describe_brokers(broker.bootstrap)
    assert [p for _, _, p in brokers] == [int(port)]


def test_start_stop_frees_the_port_and_is_idempotent(tmp_path):
    log_path = str(tmp_path / "broker.log")
    b = EmbeddedBroker(log_path=log_path)
    with b:
        assert b.is_running()
        port = b.port
        assert port > 0 and b.bootstrap == f"127.0.0.1:{port}"
        create_topic(b.bootstrap, "t", 2, timeout_s=10)
        assert list_partitions(b.bootstrap, "t", timeout_s=10) == [0, 1]
    assert not b.is_running()
    assert b.stop() is None  # second stop: no-op
    with pytest.raises(SourceError):
        describe_brokers(f"127.0.0.1:{port}", timeout_s=0.5)
    assert "listening on" in open(log_path).read()


def test_port_in_use_raises_with_log(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        b = EmbeddedBroker(port, log_path=str(tmp_path / "b.log"))
        with pytest.raises(BrokerError) as info:
            b.start(timeout_s=10)
        # Either the broker exits (address in use) or never answers Metadata: both are
        # reported with the broker's log, and nothing keeps running.
        assert "b.log" in str(info.value)
        assert not b.is_running()


def test_bad_port_number_is_rejected():
    with pytest.raises(BrokerError, match="0..65535"):
        EmbeddedBroker(70000)


def test_broker_that_exits_at_once_raises_with_its_output(tmp_path):
    b = EmbeddedBroker(binary="/bin/false", log_path=str(tmp_path / "f.log"))
    with pytest.raises(BrokerError, match="exited with code 1"):
        b.start(timeout_s=5)


def test_broker_probe_on_a_non_kafka_listener_fails():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        with pytest.raises(SourceError):
            describe_brokers(f"127.0.0.1:{port}", timeout_s=0.2)  # accepts, never answers


def test_list_topics_sees_created_topic(broker, new_topic):
    topic = new_topic(3)
    assert topic in list_topics(broker.bootstrap)
    assert list_partitions(broker.bootstrap, topic) == [0, 1, 2]


def test_run_forever_prints_bootstrap_and_stops_cleanly_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    code = ("import sys; from streams.broker import run_forever; "
            f"sys.exit(run_forever(0, log_path={str(tmp_path / 'rf.log')!r}))")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the broker is ready (or the child dies)
        assert line.startswith("bootstrap="), line
        host, port = line.strip().split("=", 1)[1].rsplit(":", 1)
        assert describe_brokers(f"{host}:{port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        with pytest.raises(SourceError):
            describe_brokers(f"{host}:{port}", timeout_s=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_missing_binary_is_a_clear_error(tmp_path):
    b = EmbeddedBroker(binary=str(tmp_path / "no-such-tansu"), log_path=str(tmp_path / "m.log"))
    with pytest.raises(BrokerError, match="cannot run the broker binary") as info:
        b.start(timeout_s=5)
    assert info.value.retriable is False
