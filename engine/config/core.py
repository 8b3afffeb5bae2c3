"""Config sections of the streaming engine: source, schema, filter, pipeline, cache, trainer."""

from __future__ import annotations

import dataclasses
import enum

__all__ = [
    "SourceKind", "KafkaClientKind", "StartPosition", "SourceConfig",
    "EventFormat", "SparseType", "DenseFeature", "SparseFeature", "SchemaConfig",
    "FilterConfig", "RunnerKind", "PipelineConfig", "CacheDurability", "CacheConfig", "OptimizerKind", "TrainerConfig",
]


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

    def __post_init__(self):
        if not self.topics:
            raise ValueError("topics must name at least one topic")
        if self.max_batch_records < 1:
            raise ValueError(f"max_batch_records must be >= 1, got {self.max_batch_records}")
        if self.poll_timeout_ms < 1:
            raise ValueError(f"poll_timeout_ms must be >= 1, got {self.poll_timeout_ms}")
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {self.max_message_bytes}")


class EventFormat(enum.Enum):
    JSON = "json"  # one JSON object per Kafka message or per line of .jsonl/.jsonl.gz
    TSV = "tsv"  # one tab-separated line per message/line; columns named by schema.columns


class SparseType(enum.Enum):
    STRING = "string"
    INT = "int"


@dataclasses.dataclass(frozen=True)
class DenseFeature:
    name: str
    default: float = 0.0  # used when the field is missing or null
    allow_nan: bool = False  # if false, NaN/inf values are dead letters (reason non_finite)
    log1p: bool = False  # apply sign(x)*log1p(|x|) at decode time (Criteo counts)


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    name: str
    rows: int = 100_000  # embedding table rows the ids are mapped into
    type: SparseType = SparseType.STRING
    multi: bool = False  # a list of values per event (embedding bag); else one value
    max_values: int = 64  # multi-valued: longer lists are dead letters (too_many_values)
    dim: int = 0  # embedding dim of this table; 0 = trainer.embedding_dim

    def __post_init__(self):
        if self.rows < 1:
            raise ValueError(f"sparse feature {self.name!r}: rows must be >= 1, got {self.rows}")
        if self.max_values < 1:
            raise ValueError(f"sparse feature {self.name!r}: max_values must be >= 1")


@dataclasses.dataclass(frozen=True)
class SchemaConfig:
    format: EventFormat = EventFormat.JSON
    label: str = "label"
    dense: tuple[DenseFeature, ...] = ()
    sparse: tuple[SparseFeature, ...] = ()
    # Event-time field in milliseconds since the epoch; "" = use the source timestamp.
    event_time: str = ""
    # TSV only: the column names in order (label, dense and sparse names among them).
    columns: tuple[str, ...] = ()

    def __post_init__(self):
        names = [self.label] + [d.name for d in self.dense] + [s.name for s in self.sparse]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"feature names must be unique; repeated: {dup}")
        if not self.dense and not self.sparse:
            raise ValueError("declare at least one [[schema.dense]] or [[schema.sparse]] feature")
        if self.format is EventFormat.TSV:
            if not self.columns:
                raise ValueError("format = 'tsv' needs columns = [...] naming every column in order")
            missing = [n for n in names if n not in self.columns]
            if missing:
                raise ValueError(f"columns does not list feature(s) {missing}")
            if any(s.multi for s in self.sparse):
                raise ValueError("multi-valued sparse features need format = 'json'")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dense) + tuple(s.name for s in self.sparse)


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    # Clauses ANDed together, over raw event fields (projected or not), e.g.
    #   "label present", "country == 'US'", "price > 0", "kind in ['click', 'view']"
    where: tuple[str, ...] = ()
    # Keep this fraction of negatives (label == 0), decided by a hash of the raw event
    # bytes so that a stream and a backfill of the same log keep the same events.
    negative_keep_rate: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.negative_keep_rate <= 1.0:
            raise ValueError(f"negative_keep_rate must be in (0, 1], got {self.negative_keep_rate}")


class RunnerKind(enum.Enum):
    DIRECT = "DirectRunner"
    PRISM = "PrismRunner"
    FLINK = "FlinkRunner"
    SPARK = "SparkRunner"
    DATAFLOW = "DataflowRunner"
    PORTABLE = "PortableRunner"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    runner: RunnerKind = RunnerKind.DIRECT
    # User transforms, "module:attr" or an entry-point name in group headrace.transforms,
    # applied in order after id remapping.
    plugins: tuple[str, ...] = ()
    # Extra Beam pipeline options passed verbatim, e.g. ["--flink_master=host:8081"].
    beam_options: tuple[str, ...] = ()


class CacheDurability(enum.Enum):
    """LMDB sync mode. ``full``: every write txn is fsynced (data and meta page).
    ``no_metasync``: the meta page is not fsynced; a machine crash (not a process crash)
    may undo the last write, which exactly-once survives because the source re-reads that
    range. Measured ~1.8x more batches/s than full (storage helper's bench)."""

    FULL = "full"
    NO_METASYNC = "no_metasync"


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    path: str = "./headrace-data/cache"
    durability: CacheDurability = CacheDurability.FULL
    max_bytes: int = 0  # retention budget for batch bytes; 0 = keep everything
    map_size_bytes: int = 1 << 36  # LMDB map size (virtual; grows the file lazily)

    def __post_init__(self):
        if self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 (0 = unlimited)")
        if self.map_size_bytes < 1 << 20:
            raise ValueError("map_size_bytes must be at least 1 MiB")


class OptimizerKind(enum.Enum):
    ADAGRAD = "adagrad"
    SGD = "sgd"
    ADAM = "adam"


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 16)  # last size must equal embedding_dim
    top_mlp: tuple[int, ...] = (64, 32)  # a final 1-unit logit layer is added
    batch_size: int = 512
    learning_rate: float = 0.05
    optimizer: OptimizerKind = OptimizerKind.ADAGRAD
    checkpoint_dir: str = "./headrace-data/checkpoints"
    checkpoint_every_batches: int = 200
    metrics_window: int = 50_000  # samples in the recent-window metrics
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    prefetch_batches: int = 4
    # torch intra-op threads for the trainer; 0 = torch's default (all cores). serve runs
    # the pipeline beside the trainer, and oversubscribed cores slow steps ~10x (measured).
    threads: int = 0

    def __post_init__(self):
        if self.embedding_dim < 1:
            raise ValueError("embedding_dim must be >= 1")
        if self.bottom_mlp and self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(
                f"bottom_mlp must end in embedding_dim ({self.embedding_dim}) so dense and sparse "
                f"vectors interact; got {list(self.bottom_mlp)}"
            )
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0 = torch default)")
        if self.checkpoint_every_batches < 1:
            raise ValueError("checkpoint_every_batches must be >= 1")
