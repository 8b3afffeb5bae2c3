"""Topic and cluster administration: create a topic (idempotently, with topic configs),
list and describe topics (partitions, leaders, replicas, configs), list partitions, wait
for a topic, describe the brokers (the embedded broker's readiness probe).

Every call opens a short-lived kafka-python admin client and closes it before
returning. Retriable failures (no broker reachable yet, leader elections, timeouts) are
retried with exponential backoff until ``timeout_s`` has passed; then a ``SourceError``
(``retriable=True``) names the bootstrap address, the topic and the last error.
Non-retriable failures (a topic that exists with another partition count, an
authorisation error) raise at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Mapping, NamedTuple, TypeVar

from streams.backend_kafka_python import kafka_python_options
from streams.errors import SourceError

__all__ = [
    "BrokerAddress",
    "PartitionInfo",
    "TopicInfo",
    "create_topic",
    "describe_topics",
    "ensure_topic",
    "describe_brokers",
    "list_partitions",
    "list_topics",
    "wait_for_topic",
    "retry_retriable",
]

_T = TypeVar("_T")
_UNKNOWN_TOPIC_OR_PARTITION = 3
_TOPIC_ALREADY_EXISTS = 36


def _is_retriable(exc: BaseException) -> bool:
    import kafka.errors as ke

    if isinstance(exc, SourceError):
        return exc.retriable
    if isinstance(exc, (ke.RetriableError, ke.KafkaConnectionError, ke.KafkaTimeoutError, OSError)):
        return True
    return bool(getattr(exc, "retriable", False))


def retry_retriable(call: Callable[[], _T], *, timeout_s: float, what: str, initial_backoff_s: float = 0.05) -> _T:
    """Run ``call()`` until it returns, retrying retriable errors with exponential backoff.

    Gives up after ``timeout_s`` with ``SourceError(retriable=True)`` naming ``what``
    and the last error; a non-retriable error propagates at once.
    """
    deadline = time.monotonic() + timeout_s
    backoff_s = initial_backoff_s
    while True:
        try:
            return call()
        except Exception as exc:  # classified just below; non-retriable ones re-raise
            if not _is_retriable(exc):
                raise
            if time.monotonic() + backoff_s > deadline:
                raise SourceError(f"{what}: still failing after {timeout_s:g} s: {exc!r}", retriable=True) from exc
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 1.0)


@contextlib.contextmanager
def _admin(bootstrap: str, client_options: Mapping[str, str] | None, timeout_s: float):
    from kafka.admin import KafkaAdminClient

    options = kafka_python_options(client_options or {})
    options.setdefault("request_timeout_ms", max(1000, int(timeout_s * 1000)))
    # Short bootstrap attempts: retry_retriable owns the overall deadline and backoff.
    options.setdefault("bootstrap_timeout_ms", min(2000, max(100, int(timeout_s * 1000))))
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="headrace-admin", **options)
    try:
        yield admin
    finally:
        admin.close()


def _describe(admin, topic: str) -> list[int] | None:
    """Sorted partition ids of ``topic``, or None when the broker does not know it."""
    import kafka.errors as ke

    (desc,) = admin.describe_topics([topic])
    code = desc.get("error_code", 0)
    if code == _UNKNOWN_TOPIC_OR_PARTITION:
        return None
    if code:
        err = ke.for_code(code)
        raise err(f"describe topic {topic!r}")
    return sorted(p["partition_index"] for p in desc["partitions"])


def list_partitions(
    bootstrap: str, topic: str, *, timeout_s: float = 30.0, client_options: Mapping[str, str] | None = None
) -> list[int]:
    """Sorted partition ids of an existing topic.

    Raises ``SourceError`` (not retriable) when the topic does not exist.
    """
    def call():
        with _admin(bootstrap, client_options, timeout_s) as admin:
            return _describe(admin, topic)

    parts = retry_retriable(call, timeout_s=timeout_s, what=f"list partitions of {topic!r} on {bootstrap}")
    if parts is None:
        raise SourceError(
            f"topic {topic!r} does not exist on {bootstrap}; create it first "
            f"(headrace topic create / streams.admin.create_topic) or fix source.topics",
            retriable=False,
        )
    return parts


class BrokerAddress(NamedTuple):
    """One broker as the cluster advertises it: where clients will be sent."""

    node_id: int
    host: str
    port: int


def describe_brokers(
    bootstrap: str, *, timeout_s: float = 30.0, client_options: Mapping[str, str] | None = None
) -> list[BrokerAddress]:
    """The brokers the cluster advertises, sorted by node id.

    An answer means the broker at ``bootstrap`` speaks Kafka and tells clients where to
    connect. Retries until ``timeout_s``; then ``SourceError(retriable=True)``.
    """
    def call() -> list[BrokerAddress]:
        with _admin(bootstrap, client_options, timeout_s) as admin:
            cluster = admin.describe_cluster()
        return sorted(BrokerAddress(b["broker_id"], b["host"], b["port"]) for b in cluster["brokers"])

    return retry_retriable(call, timeout_s=timeout_s, what=f"describe the brokers at {bootstrap}")


def list_topics(
    bootstrap: str, *, timeout_s: float = 30.0, client_options: Mapping[str, str] | None = None
) -> list[str]:
    """Sorted names of the topics the broker reports (internal topics included)."""
    def call():
        with _admin(bootstrap, client_options, timeout_s) as admin:
            return sorted(admin.list_topics())

    return retry_retriable(call, timeout_s=timeout_s, what=f"list topics on {bootstrap}")


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    configs: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    client_options: Mapping[str, str] | None = None,
) -> bool:
    """Create ``name`` with ``partitions`` partitions and wait until it is visible.
    ``configs``: topic configs set at creation (``retention.ms``, ``cleanup.policy``, ...).

    Idempotent: returns True when this call created the topic, False when it already
    existed with the same partition count (its configs are left as they are). Raises
    ``SourceError`` (not retriable) when it exists with a different count (Kafka cannot
    shrink a topic; pick another name or delete it), or when ``partitions < 1``.
    """
    import kafka.errors as ke
    from kafka.admin import NewTopic

    if partitions < 1:
        raise SourceError(f"topic {name!r}: partitions must be >= 1, got {partitions}", retriable=False)
    if not name:
        raise SourceError("topic name must not be empty", retriable=False)

    def call() -> bool:
        with _admin(bootstrap, client_options, timeout_s) as admin:
            try:
                admin.create_topics([NewTopic(name, partitions, replication_factor,
                                              topic_configs=dict(configs or {}))])
                return True
            except ke.TopicAlreadyExistsError:
                return False

    created = retry_retriable(call, timeout_s=timeout_s, what=f"create topic {name!r} on {bootstrap}")
    existing = wait_for_topic(bootstrap, name, timeout_s=timeout_s, client_options=client_options)
    if len(existing) != partitions:
        raise SourceError(
            f"topic {name!r} already exists on {bootstrap} with {len(existing)} partition(s), "
            f"not the {partitions} requested; use partitions={len(existing)} or another topic name",
            retriable=False,
        )
    return created


def wait_for_topic(
    bootstrap: str,
    topic: str,
    *,
    min_partitions: int = 1,
    timeout_s: float = 30.0,
    client_options: Mapping[str, str] | None = None,
) -> list[int]:
    """Block until ``topic`` exists with at least ``min_partitions`` partitions; return them.

    Polls metadata with backoff; raises ``SourceError(retriable=True)`` after ``timeout_s``.
    """
    def call() -> list[int]:
        with _admin(bootstrap, client_options, timeout_s) as admin:
            parts = _describe(admin, topic)
        if parts is None or len(parts) < min_partitions:
            raise SourceError(
                f"topic {topic!r} has {0 if parts is None else len(parts)} partition(s), "
                f"waiting for {min_partitions}",
                retriable=True,
            )
        return parts

    return retry_retriable(call, timeout_s=timeout_s, what=f"wait for topic {topic!r} on {bootstrap}")


class PartitionInfo(NamedTuple):
    """One partition as the cluster reports it."""

    partition: int
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TopicInfo:
    """A topic's partitions and configs (``configs``: the non-default ones, or all of them
    when asked; empty where the broker does not report configs, as the embedded one)."""

    name: str
    partitions: tuple[PartitionInfo, ...]
    configs: dict[str, str]
    internal: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "partitions": len(self.partitions), "internal": self.internal,
                "partition_details": [p._asdict() | {"replicas": list(p.replicas), "isr": list(p.isr)}
                                      for p in self.partitions],
                "configs": dict(self.configs)}


def describe_topics(
    bootstrap: str,
    topics: list[str] | None = None,
    *,
    configs: bool = True,
    all_configs: bool = False,
    timeout_s: float = 30.0,
    client_options: Mapping[str, str] | None = None,
) -> list[TopicInfo]:
    """Partitions (and configs, unless ``configs=False``) of ``topics``, or of every topic
    when None, sorted by name. A named topic that does not exist raises ``SourceError`` (not
    retriable). ``all_configs``: every config with its value, not only the non-default ones."""
    import kafka.errors as ke
    from kafka.admin import ConfigResource, ConfigResourceType

    def call() -> list[TopicInfo]:
        with _admin(bootstrap, client_options, timeout_s) as admin:
            names = sorted(topics) if topics is not None else sorted(admin.list_topics())
            if not names:
                return []
            descs = admin.describe_topics(names)
            for desc in descs:
                code = desc.get("error_code", 0)
                if code == _UNKNOWN_TOPIC_OR_PARTITION:
                    raise SourceError(f"topic {desc.get('name')!r} does not exist on {bootstrap} "
                                      f"(headrace topic list shows the topics)", retriable=False)
                if code:
                    raise ke.for_code(code)(f"describe topic {desc.get('name')!r}")
            found: dict[str, dict[str, str]] = {}
            if configs:
                resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
                answer = admin.describe_configs(resources, config_filter="all" if all_configs else "modified")
                for name, entries in (answer.get("topic") or {}).items():
                    found[name] = {k: ("" if v.get("value") is None else str(v.get("value")))
                                   for k, v in entries.items()}
        out = []
        for desc in descs:
            parts = tuple(sorted(PartitionInfo(p["partition_index"], p.get("leader_id", -1),
                                               tuple(p.get("replica_nodes") or ()), tuple(p.get("isr_nodes") or ()))
                                 for p in desc["partitions"]))
            out.append(TopicInfo(desc["name"], parts, found.get(desc["name"], {}), bool(desc.get("is_internal"))))
        return sorted(out, key=lambda t: t.name)

    return retry_retriable(call, timeout_s=timeout_s, what=f"describe topics on {bootstrap}")


def ensure_topic(
    bootstrap: str,
    name: str,
    partitions: int | None = None,
    *,
    timeout_s: float = 30.0,
    client_options: Mapping[str, str] | None = None,
) -> bool:
    """Create ``name`` unless it exists; returns True when this call created it. With
    ``partitions`` None an existing topic is fine whatever its partition count (a new one
    gets 1); with a count, an existing topic must have exactly that many (``create_topic``)."""
    if partitions is None:
        def call() -> bool:
            with _admin(bootstrap, client_options, timeout_s) as admin:
                return _describe(admin, name) is not None

        if retry_retriable(call, timeout_s=timeout_s, what=f"look up topic {name!r} on {bootstrap}"):
            return False
    return create_topic(bootstrap, name, partitions or 1, timeout_s=timeout_s, client_options=client_options)
