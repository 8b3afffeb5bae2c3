"""Config sections owned by ``transforms``: [schema] (event format and features), [filter]
(which events are kept) and [hash] (how sparse ids are mapped to embedding rows: see
``transforms.mappers``, ``transforms.learned_hash``, ``transforms.hash_fit``).

Sections are frozen dataclasses that validate themselves in ``__post_init__`` (raising
``ValueError``); ``engine.config`` loads them from TOML and names the key and file on error.
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = [
    "EventFormat", "SparseType", "DenseFeature", "SparseFeature", "SchemaConfig", "FilterConfig",
    "HashConfig", "FitKind",
]


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


class FitKind(enum.Enum):
    """What ``headrace fit-hash`` (and the periodic re-fit in ``serve``) fits per feature."""

    LEARNED = "learned"  # hot ids own rows, other seen ids share rows by similarity cluster
    FREQUENCY = "frequency"  # hot ids own rows, every other id hashed into the rest


@dataclasses.dataclass(frozen=True)
class HashConfig:
    # Mapper used until a fitted mapping exists: "modulo" (the hashing trick) or "double".
    mapper: str = "modulo"
    # Directory holding fitted, versioned mappings; "" = <cache.path>/mappings.
    mappings_dir: str = ""
    # --- fitting (headrace fit-hash, serve's periodic re-fit)
    fit: FitKind = FitKind.LEARNED
    hot_fraction: float = 0.25  # share of a table's rows owned by its most frequent ids
    reserve_fraction: float = 0.02  # share of rows for ids unseen at fit time (at least 1 row)
    label_weight: float = 1.0  # weight of the click-through statistic in the id similarity
    embedding_weight: float = 1.0  # weight of the current model's embeddings in the similarity
    embedding_components: int = 4  # principal components of the embeddings used
    min_events_to_fit: int = 10_000  # a feature with fewer counted events keeps its mapper
    # Periodic re-fit in serve: seconds between fits (0 = never re-fit automatically).
    refit_every_s: float = 0.0
    # --- statistics kept with the cache (storage.id_stats)
    stats_enabled: bool = True
    stats_head_capacity: int = 1_000_000  # exact per-id counts kept per feature
    sketch_width: int = 1 << 16  # count-min sketch of the evicted tail, per feature
    sketch_depth: int = 4

    def __post_init__(self):
        for name in ("hot_fraction", "reserve_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.hot_fraction + self.reserve_fraction >= 1.0:
            raise ValueError(
                f"hot_fraction + reserve_fraction = {self.hot_fraction + self.reserve_fraction} leaves no "
                "rows to share; keep their sum below 1"
            )
        if self.label_weight < 0 or self.embedding_weight < 0:
            raise ValueError("label_weight and embedding_weight must be >= 0")
        if self.embedding_components < 1:
            raise ValueError("embedding_components must be >= 1")
        if self.min_events_to_fit < 0 or self.refit_every_s < 0:
            raise ValueError("min_events_to_fit and refit_every_s must be >= 0")
        if self.stats_head_capacity < 2:
            raise ValueError(f"stats_head_capacity must be >= 2, got {self.stats_head_capacity}")
        if not 1 <= self.sketch_width < 1 << 32 or self.sketch_depth < 1:
            raise ValueError("sketch_width must be in [1, 2**32) and sketch_depth >= 1")
