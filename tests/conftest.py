"""Shared fixtures: one embedded broker per test session, one fresh topic per test.

``broker``: a started ``streams.broker.EmbeddedBroker`` (``broker.bootstrap`` is the
address). Started lazily by the first test that asks for it, stopped at session end. A
broker that cannot start fails (not hangs) every test that uses it, with its log tail in
the error. Set ``HEADRACE_TEST_BOOTSTRAP=host:port`` to run against an existing Kafka
cluster instead (``broker`` is then a small object with ``.bootstrap``).

``new_topic``: a factory ``new_topic(partitions=1) -> str`` creating a topic with a name
unique to the test (and to each call) on the session broker.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import uuid

import pytest

__all__ = ["broker", "new_topic", "one_torch_thread"]

_BROKER_START_TIMEOUT_S = 30.0
_TOPIC_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class ExternalBroker:
    """A Kafka cluster the test session did not start (HEADRACE_TEST_BOOTSTRAP)."""

    bootstrap: str


@pytest.fixture(scope="session")
def broker():
    external = os.environ.get("HEADRACE_TEST_BOOTSTRAP")
    if external:
        yield ExternalBroker(external)
        return
    from engine.errors import BrokerError
    from streams.broker import EmbeddedBroker

    instance = EmbeddedBroker()
    try:
        instance.start(timeout_s=_BROKER_START_TIMEOUT_S)
    except BrokerError as exc:
        pytest.fail(f"embedded broker failed to start: {exc}", pytrace=False)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def new_topic(broker, request):
    from streams.admin import create_topic

    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:80].strip("-") or "test"
    run_id = uuid.uuid4().hex[:8]
    counter = itertools.count()

    def make(partitions: int = 1) -> str:
        name = f"{stem}-{run_id}-{next(counter)}"
        create_topic(broker.bootstrap, name, partitions, timeout_s=_TOPIC_TIMEOUT_S)
        return name

    return make


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test, restored after: small models on a shared
    2-core machine only spin extra threads against each other, and a resumed run is bitwise
    the uninterrupted one only at the same thread count (a worker process runs one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
