"""Config section [source]: where events come from (Kafka topics) and how the client reads them.

Sections are frozen dataclasses that validate themselves in ``__post_init__`` (raising
``ValueError``); ``engine.config`` loads them from TOML and turns those into errors that name
the key and the file.
"""

from __future__ import annotations

import dataclasses
import enum

from streams.assignment import parse_member

__all__ = ["SourceKind", "KafkaClientKind", "StartPosition", "SourceConfig"]


class KafkaClientKind(enum.Enum):
    AUTO = "auto"  # confluent-kafka when importable, else kafka-python
    KAFKA_PYTHON = "kafka-python"
    CONFLUENT = "confluent"


class StartPosition(enum.Enum):
    """Where a partition with no offset in the cache starts."""

    EARLIEST = "earliest"
    LATEST = "latest"


class SourceKind(enum.Enum):
    KAFKA = "kafka"


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    kind: SourceKind = SourceKind.KAFKA
    bootstrap: str = "127.0.0.1:9092"
    topics: tuple[str, ...] = ("events",)
    group_id: str = "headrace"
    start: StartPosition = StartPosition.EARLIEST
    client: KafkaClientKind = KafkaClientKind.AUTO
    max_batch_records: int = 4096
    poll_timeout_ms: int = 200
    max_message_bytes: int = 1 << 20
    # Extra client properties passed verbatim (security, SASL, ...): name -> value.
    client_options: dict[str, str] = dataclasses.field(default_factory=dict)
    # "i/n": this host is member i of n hosts splitting the topics' partitions (host i takes
    # partition p when p mod n == i; see streams.assignment). "0/1": all partitions.
    member: str = "0/1"

    def __post_init__(self):
        if not self.topics:
            raise ValueError("topics must name at least one topic")
        if self.max_batch_records < 1:
            raise ValueError(f"max_batch_records must be >= 1, got {self.max_batch_records}")
        if self.poll_timeout_ms < 1:
            raise ValueError(f"poll_timeout_ms must be >= 1, got {self.poll_timeout_ms}")
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {self.max_message_bytes}")
        parse_member(self.member)
