"""Config sections owned by ``transforms``: [schema] (event format and features), [filter]
(which events are kept) and [hash] (how sparse ids are mapped to embedding rows: see
``transforms.mappers``, ``transforms.learned_hash``, ``transforms.hash_fit``).

Sections are frozen dataclasses that validate themselves in ``__post_init__`` (raising
``ValueError``); ``engine.config`` loads them from TOML and names the key and file on error.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Mapping

from transforms.errors import TransformConfigError
from transforms.expressions import parse_expression

__all__ = [
    "EventFormat", "SparseType", "DenseFeature", "SparseFeature", "SchemaConfig", "FilterConfig",
    "HashConfig", "FitKind",
]


class EventFormat(enum.Enum):
    JSON = "json"  # one JSON object per Kafka message or per line of .jsonl/.jsonl.gz
    TSV = "tsv"  # one tab-separated line per message/line; columns named by schema.columns
    CSV = "csv"  # one RFC 4180 record per message/file record; columns from the file header or schema.columns


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
    # A hashed feature cross: the id is ``hashing.hash_cross`` of these sparse features'
    # ids, not a field of the event (``type`` does not apply).
    cross: tuple[str, ...] = ()

    def __post_init__(self):
        if self.rows < 1:
            raise ValueError(f"sparse feature {self.name!r}: rows must be >= 1, got {self.rows}")
        if self.max_values < 1:
            raise ValueError(f"sparse feature {self.name!r}: max_values must be >= 1")
        if self.cross:
            if len(self.cross) < 2 or len(set(self.cross)) != len(self.cross):
                raise ValueError(f"sparse feature {self.name!r}: cross must name two or more different sparse "
                                 f"features, got {list(self.cross)}")
            if self.multi:
                raise ValueError(f"sparse feature {self.name!r}: a cross is single-valued; remove multi = true")


def cross_name(features: tuple[str, ...]) -> str:
    """The name of the cross of ``features`` declared in ``[schema] cross``: joined by ``_x_``."""
    return "_x_".join(features)


_DERIVED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@dataclasses.dataclass(frozen=True)
class SchemaConfig:
    format: EventFormat = EventFormat.JSON
    label: str = "label"
    dense: tuple[DenseFeature, ...] = ()
    sparse: tuple[SparseFeature, ...] = ()
    # Event-time field in milliseconds since the epoch; "" = use the source timestamp.
    event_time: str = ""
    # TSV: the column names in order (every field read from the event among them). CSV: the
    # columns of records without a header row (Kafka messages; files when csv_header = false).
    columns: tuple[str, ...] = ()
    # CSV only: each file's first record is a header naming its columns (not an event).
    csv_header: bool = True
    # Derived fields: name -> expression over raw fields (``transforms.expressions``), e.g.
    # {liked = "rating >= 4"}; usable as the label, a dense or int sparse feature, the
    # event time, in [filter] where, and in later derive entries.
    derive: dict[str, str] = dataclasses.field(default_factory=dict)
    # Hashed feature crosses, each a list of sparse feature names; each becomes a sparse
    # feature named ``cross_name(features)`` with ``cross_rows`` rows, appended to
    # ``sparse`` (declare one as [[schema.sparse]] with cross = [...] for its own name/rows).
    cross: tuple[tuple[str, ...], ...] = ()
    cross_rows: int = 100_000

    def __post_init__(self):
        if not isinstance(self.derive, Mapping):
            raise ValueError(f"derive must be a table of name = \"expression\", got {self.derive!r}")
        object.__setattr__(self, "derive", dict(self.derive))  # a plain dict pickles
        self._expand_crosses()
        names = [self.label] + [d.name for d in self.dense] + [s.name for s in self.sparse]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"feature names must be unique; repeated: {dup}")
        if not self.dense and not self.sparse:
            raise ValueError("declare at least one [[schema.dense]] or [[schema.sparse]] feature")
        self._check_derive()
        self._check_crosses()
        if self.format in (EventFormat.TSV, EventFormat.CSV):
            fmt = self.format.value
            if self.format is EventFormat.TSV and not self.columns:
                raise ValueError("format = 'tsv' needs columns = [...] naming every column in order")
            if self.format is EventFormat.CSV and not self.columns and not self.csv_header:
                raise ValueError("format = 'csv' with csv_header = false needs columns = [...] naming every "
                                 "column in order")
            missing = [n for n in self.raw_fields if n not in self.columns]
            if self.columns and missing:
                raise ValueError(f"columns does not list field(s) {missing} read from the event")
            if any(s.multi for s in self.sparse):
                raise ValueError(f"multi-valued sparse features need format = 'json', not {fmt!r}")

    def _expand_crosses(self) -> None:
        if self.cross_rows < 1:
            raise ValueError(f"cross_rows must be >= 1, got {self.cross_rows}")
        have = {s.name: s for s in self.sparse}
        added = []
        for i, feats in enumerate(self.cross):
            feats = tuple(feats)
            name = cross_name(feats)
            if name in have and have[name].cross == feats:
                continue  # already expanded (dataclasses.replace of an expanded schema)
            try:
                added.append(SparseFeature(name, rows=self.cross_rows, type=SparseType.INT, cross=feats))
            except ValueError as exc:
                raise ValueError(f"cross[{i}]: {exc}") from None
        if added:
            object.__setattr__(self, "sparse", tuple(self.sparse) + tuple(added))

    def _check_derive(self) -> None:
        order = list(self.derive)
        by_name = {s.name: s for s in self.sparse}
        for i, (name, text) in enumerate(self.derive.items()):
            where = f"derive.{name}"
            if not isinstance(name, str) or not _DERIVED_NAME.match(name):
                raise ValueError(f"{where}: a derived field name is letters, digits, '_' and '.', starting "
                                 "with a letter or '_'")
            try:
                expr = parse_expression(text)
            except TransformConfigError as exc:
                raise ValueError(f"{where}: {exc}") from None
            for ref in expr.fields:
                if ref == name:
                    raise ValueError(f"{where} = {text!r} refers to itself; name the raw field differently")
                if ref in self.derive and order.index(ref) > i:
                    raise ValueError(f"{where} = {text!r} reads {ref!r}, which is derived later; list "
                                     f"derive.{ref} before derive.{name}")
                s = by_name.get(ref)
                if s is not None and (s.multi or s.type is SparseType.STRING) and ref not in self.derive:
                    kind = "multi-valued" if s.multi else "a string"
                    raise ValueError(f"{where} = {text!r} reads sparse feature {ref!r}, which is {kind}; "
                                     "expressions compute on numbers")
            s = by_name.get(name)
            if s is not None and s.cross:
                raise ValueError(f"{where}: {name!r} is a feature cross; derive another name")
            if s is not None and (s.type is not SparseType.INT or s.multi):
                raise ValueError(f"{where}: sparse feature {name!r} is derived (a number), so declare it "
                                 "single-valued with type = \"int\" (values are rounded down to integers)")

    def _check_crosses(self) -> None:
        by_name = {s.name: (i, s) for i, s in enumerate(self.sparse)}
        for i, s in enumerate(self.sparse):
            for f in s.cross:
                if f not in by_name:
                    raise ValueError(f"sparse feature {s.name!r} crosses {f!r}, which is not a sparse feature; "
                                     f"declare [[schema.sparse]] name = {f!r} (sparse features: {sorted(by_name)})")
                j, other = by_name[f]
                if other.multi:
                    raise ValueError(f"sparse feature {s.name!r} crosses {f!r}, which is multi-valued; crosses "
                                     "take single-valued features")
                if j >= i:
                    raise ValueError(f"sparse feature {s.name!r} crosses {f!r}, which is declared after it; "
                                     "declare crossed features first")

    def __hash__(self) -> int:
        return hash((self.format, self.label, self.dense, self.sparse, self.event_time, self.columns,
                     self.csv_header, tuple(self.derive.items()), self.cross, self.cross_rows))

    @property
    def raw_fields(self) -> tuple[str, ...]:
        """Fields read from the event itself (not derived, not crosses): the label, dense and
        sparse features, the event time, and every raw field a derived expression reads."""
        out = [self.label, *(d.name for d in self.dense), *(s.name for s in self.sparse if not s.cross)]
        if self.event_time:
            out.append(self.event_time)
        for text in self.derive.values():
            out += parse_expression(text).fields
        return tuple(n for n in dict.fromkeys(out) if n not in self.derive)

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
    # Bytes one feature's fitted mapper may take (id table + bucket codes); 0 = no limit
    # (a learned fit stores every seen id, ~26 bytes each).
    max_mapper_bytes: int = 0
    # Periodic re-fit in serve: seconds between fits (0 = never re-fit automatically).
    refit_every_s: float = 0.0
    # Fitted versions kept on disk: after each fit the older ones are deleted, except any
    # a cached batch or the trainer's checkpoint still needs (0 = keep every version).
    keep_mappings: int = 4
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
        if self.max_mapper_bytes != 0 and self.max_mapper_bytes < 64:
            raise ValueError(f"max_mapper_bytes must be 0 (no limit) or >= 64 (one table bucket), "
                             f"got {self.max_mapper_bytes}")
        if self.keep_mappings < 0:
            raise ValueError(f"keep_mappings must be >= 0 (0 = keep every version), got {self.keep_mappings}")
        if self.stats_head_capacity < 2:
            raise ValueError(f"stats_head_capacity must be >= 2, got {self.stats_head_capacity}")
        if not 1 <= self.sketch_width < 1 << 32 or self.sketch_depth < 1:
            raise ValueError("sketch_width must be in [1, 2**32) and sketch_depth >= 1")
