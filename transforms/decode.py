"""Decode + validate: raw payloads -> typed columns of the good rows, plus dead letters.

``DecodePlan`` lists every field an event must yield (label, dense, sparse, the event-time
field, fields the filter or a derived expression reads) with the Arrow type it is parsed
as, and where it comes from (``FieldSource``): read from the event, derived from other
fields (``[schema] derive``, ``transforms.derive``) or a hashed cross of sparse ids. The
format decoders (``decode_json``, ``decode_tsv``, ``decode_csv``) get ``plan.raw`` (only
the fields read from the event; its ``label``/``event_time`` are "" when those are
derived) and return a ``Decoded``: raw-typed columns of the rows they could parse (nulls
where a field is missing) and ``Rejects`` for the rest; ``derive`` adds the derived
columns and ``validate`` then applies the format-independent checks, vectorised.

Raw types: label, dense, numeric filter fields and expression inputs float64; string
sparse and string or presence-only filter fields string; int sparse and the event time
int64; multi-valued sparse features list<string|int64>. Derived fields: float64, or int64
(rounded down) when they are an int sparse feature or the event time; crosses: int64 ids.

Rules (one reason per dead letter; the first that applies, in this order):

==================  ======================================================  =========
reason              when                                                    stage
==================  ======================================================  =========
empty_message       value null or zero bytes                                decode
oversize            ``len(value) > max_message_bytes``                      decode
not_utf8            bytes are not valid UTF-8                               decode
malformed_json      not one JSON document (incl. NaN/Infinity literals)     decode
not_an_object       JSON but not an object                                  decode
bad_tsv_row         TSV line with the wrong number of tab-separated columns decode
bad_csv_row         CSV record: unbalanced or misplaced quote, a line break  decode
                    outside quotes, or the wrong number of fields
missing_label       label missing or null (TSV: empty)                      validate
bad_label           label not a number, or outside [0, 1] (NaN too)         validate
wrong_type          a field's value has the wrong type (JSON type; TSV int   validate
                    or number that does not parse; null inside a list)
bad_event_time      event-time field not an int64 >= 0                      validate
non_finite          dense value (after float32 cast) NaN/inf, unless         validate
                    ``allow_nan``; a JSON number overflowing double
too_many_values     multi-valued list longer than ``max_values``            validate
wrong_type /        a derived int sparse feature / event time that is not   validate
bad_event_time      finite or outside int64 after rounding down
==================  ======================================================  =========

Missing or null values are not errors: dense -> ``default``; sparse single ->
``hashing.MISSING_ID``; sparse multi -> empty list; event time -> the record timestamp.
JSON types are strict: a string feature wants a JSON string, an int feature a JSON integer
in int64 range, dense/label a JSON number (not a bool).
"""

from __future__ import annotations

import dataclasses
import enum

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.config import EventFormat, SchemaConfig, SparseType
from transforms.elements import Reason, Stage
from transforms.errors import TransformConfigError
from transforms.expressions import Expression, parse_expression
from transforms.filters import FilterPlan, LiteralKind

__all__ = [
    "FieldRole", "FieldSource", "FieldSpec", "DecodePlan", "Rejects", "Decoded", "validate", "VALIDATE_REASONS",
    "scan_rows", "join_rows", "raw_buffers",
]


class FieldRole(enum.Enum):
    LABEL = "label"
    DENSE = "dense"
    SPARSE = "sparse"
    EVENT_TIME = "event_time"
    FILTER = "filter"
    INPUT = "input"  # not a feature: read only by derived expressions (or derived and unused)


class FieldSource(enum.Enum):
    EVENT = "event"  # read from the event by the format decoder
    DERIVED = "derived"  # computed from other fields by an expression (``expr``)
    CROSS = "cross"  # id hashed from the ids of the sparse features ``cross``


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    name: str
    role: FieldRole
    arrow_type: pa.DataType
    multi: bool = False
    max_values: int = 0
    default: float = 0.0
    allow_nan: bool = False
    log1p: bool = False
    source: FieldSource = FieldSource.EVENT
    expr: Expression | None = None  # DERIVED
    cross: tuple[str, ...] = ()  # CROSS


VALIDATE_REASONS = frozenset({
    Reason.MISSING_LABEL, Reason.BAD_LABEL, Reason.WRONG_TYPE, Reason.BAD_EVENT_TIME,
    Reason.NON_FINITE, Reason.TOO_MANY_VALUES,
})


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Every field to extract, in schema order (label, dense, sparse, event time, filter,
    expression inputs); ``derived`` names the derived fields in evaluation order."""

    format: EventFormat
    fields: tuple[FieldSpec, ...]
    label: str
    event_time: str
    columns: tuple[str, ...]  # TSV/CSV column names (CSV: of records without a header)
    filter_fields: tuple[str, ...] = ()  # fields the filter reads
    derived: tuple[str, ...] = ()
    #: The plan of the fields read from the event (the format decoders' view); ``self``
    #: when nothing is derived or crossed.
    raw: "DecodePlan" = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if all(f.source is FieldSource.EVENT for f in self.fields):
            object.__setattr__(self, "raw", self)
            return
        read = tuple(f for f in self.fields if f.source is FieldSource.EVENT)
        names = {f.name for f in read}
        object.__setattr__(self, "raw", DecodePlan(
            self.format, read, self.label if self.label in names else "",
            self.event_time if self.event_time in names else "", self.columns,
            tuple(n for n in self.filter_fields if n in names)))

    @classmethod
    def build(cls, schema: SchemaConfig, filt: FilterPlan) -> "DecodePlan":
        derived = {name: parse_expression(text) for name, text in schema.derive.items()}

        def spec(name: str, role: FieldRole, arrow_type: pa.DataType, **kw) -> FieldSpec:
            if name in derived:
                if role is FieldRole.SPARSE or role is FieldRole.EVENT_TIME:
                    arrow_type = pa.int64()
                return FieldSpec(name, role, arrow_type, source=FieldSource.DERIVED, expr=derived[name], **kw)
            return FieldSpec(name, role, arrow_type, **kw)

        fields: list[FieldSpec] = [spec(schema.label, FieldRole.LABEL, pa.float64())]
        for d in schema.dense:
            fields.append(spec(d.name, FieldRole.DENSE, pa.float64(), default=d.default,
                               allow_nan=d.allow_nan, log1p=d.log1p))
        for s in schema.sparse:
            if s.cross:
                fields.append(FieldSpec(s.name, FieldRole.SPARSE, pa.int64(), source=FieldSource.CROSS,
                                        cross=s.cross))
                continue
            t = pa.string() if s.type is SparseType.STRING else pa.int64()
            fields.append(spec(s.name, FieldRole.SPARSE, pa.list_(t) if s.multi else t,
                               multi=s.multi, max_values=s.max_values))
        known = {f.name for f in fields}
        if schema.event_time:
            if schema.event_time in known:
                raise TransformConfigError(f"schema.event_time {schema.event_time!r} is also a feature; name a separate field")
            fields.append(spec(schema.event_time, FieldRole.EVENT_TIME, pa.int64()))
            known.add(schema.event_time)
        for name in derived:
            if name not in known:
                role = FieldRole.FILTER if name in filt.fields else FieldRole.INPUT
                fields.append(spec(name, role, pa.float64()))
                known.add(name)
        by_name = {f.name: f for f in fields}
        for name, expr in derived.items():
            for ref in expr.fields:
                if ref not in by_name:
                    _check_listed(schema, ref, f"derive.{name} reads field {ref!r}")
                    by_name[ref] = FieldSpec(ref, FieldRole.INPUT, pa.float64())
                    fields.append(by_name[ref])
                elif by_name[ref].arrow_type == pa.string() or by_name[ref].multi:
                    raise TransformConfigError(
                        f"derive.{name} = {expr.text!r} reads {ref!r}, which is {by_name[ref].arrow_type}; "
                        "expressions compute on numbers")
        for name in filt.fields:
            kind = filt.literal_kind(name)
            if name in by_name:
                _check_filter_type(by_name[name], kind, filt)
                continue
            t = pa.float64() if kind is LiteralKind.NUMBER else pa.string()
            by_name[name] = FieldSpec(name, FieldRole.FILTER, t)
            fields.append(by_name[name])
            _check_listed(schema, name, f"filter field {name!r}")
        return cls(schema.format, tuple(fields), schema.label, schema.event_time, schema.columns, filt.fields,
                   tuple(derived))

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([(f.name, f.arrow_type) for f in self.fields])


def _check_listed(schema: SchemaConfig, name: str, what: str) -> None:
    if schema.format in (EventFormat.TSV, EventFormat.CSV) and schema.columns and name not in schema.columns:
        raise TransformConfigError(
            f"{what} is not one of schema.columns {list(schema.columns)}; a {schema.format.value.upper()} "
            "record can only yield listed columns: add it to columns")


def _check_filter_type(f: FieldSpec, kind: LiteralKind | None, filt: FilterPlan) -> None:
    texts = [c.text for c in filt.clauses if c.field == f.name]
    if kind is None:
        return
    if f.multi:
        raise TransformConfigError(f"filter {texts}: {f.name!r} is multi-valued; only `present`/`missing` apply to it")
    numeric = f.arrow_type != pa.string()
    if numeric != (kind is LiteralKind.NUMBER):
        want = "numbers" if numeric else "'quoted strings'"
        raise TransformConfigError(f"filter {texts}: field {f.name!r} is {f.arrow_type}; compare it with {want}")


class Rejects:
    """Dead rows found so far: row index (into the source batch) -> (stage, reason, detail).
    The first rejection of a row wins (callers reject in precedence order)."""

    def __init__(self):
        self.rows: dict[int, tuple[Stage, Reason, str]] = {}

    def add(self, row: int, reason: Reason, detail: str) -> None:
        if row not in self.rows:
            stage = Stage.VALIDATE if reason in VALIDATE_REASONS else Stage.DECODE
            self.rows[int(row)] = (stage, reason, detail)

    def __len__(self) -> int:
        return len(self.rows)


@dataclasses.dataclass
class Decoded:
    """Columns (``DecodePlan`` raw types) of the rows ``index`` (ascending source-row
    indices) that parsed."""

    index: np.ndarray
    columns: dict[str, pa.Array]
    #: After ``validate``: dense features as float32, defaults filled, log1p applied.
    dense: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: Single-valued string sparse features already hashed (``hashing.hash_strings``) by
    #: the fast JSON path; such a feature has no entry in ``columns`` unless filtered on.
    ids: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def take(self, mask: np.ndarray) -> "Decoded":
        if mask.all():
            return self
        keep = pa.array(mask)
        return Decoded(self.index[mask], {k: v.filter(keep) for k, v in self.columns.items()},
                       {k: v[mask] for k, v in self.dense.items()}, {k: v[mask] for k, v in self.ids.items()})


# --------------------------------------------------------------------- buffer kernels

def raw_buffers(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets of len n+1, uint8 data) of a binary array, honouring its slice offset."""
    otype = np.int64 if pa.types.is_large_binary(values.type) else np.int32
    bufs = values.buffers()
    offsets = np.frombuffer(bufs[1], dtype=otype)[values.offset: values.offset + len(values) + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(1, np.uint8)
    return offsets, data


FLAG_NEWLINE = 1  # \n or \r inside the row
FLAG_NON_ASCII = 2  # some byte >= 0x80 (UTF-8 must be checked)


@numba.njit(cache=True, nogil=True)
def scan_rows(data, starts, ends):
    """Per row: number of tab bytes and FLAG_* bits."""
    n = starts.shape[0]
    tabs = np.zeros(n, dtype=np.int64)
    flags = np.zeros(n, dtype=np.uint8)
    for i in range(n):
        t = 0
        f = 0
        for k in range(starts[i], ends[i]):
            b = data[k]
            if b == 9:
                t += 1
            elif b == 10 or b == 13:
                f |= 1
            elif b >= 128:
                f |= 2
        tabs[i] = t
        flags[i] = f
    return tabs, flags


@numba.njit(cache=True, nogil=True)
def join_rows(data, starts, ends, blank_newlines=True):
    """The rows' bytes, each followed by ``\\n``; with ``blank_newlines``, ``\\n``/``\\r``
    inside a row are replaced by a space (JSON whitespace; the caller has checked such rows
    are valid JSON), else kept (quoted CSV line breaks)."""
    total = 0
    for i in range(starts.shape[0]):
        total += ends[i] - starts[i] + 1
    out = np.empty(total, dtype=np.uint8)
    p = 0
    for i in range(starts.shape[0]):
        for k in range(starts[i], ends[i]):
            b = data[k]
            out[p] = 32 if (blank_newlines and (b == 10 or b == 13)) else b
            p += 1
        out[p] = 10
        p += 1
    return out


# --------------------------------------------------------------------- validation

def _np(arr: pa.Array, fill) -> np.ndarray:
    return pc.fill_null(arr, fill).to_numpy(zero_copy_only=False) if arr.null_count else arr.to_numpy(zero_copy_only=False)


def _nulls(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.zeros(len(arr), dtype=bool)
    return arr.is_null().to_numpy(zero_copy_only=False)


def validate(plan: DecodePlan, dec: Decoded, rejects: Rejects) -> Decoded:
    """Apply the format-independent checks (label, nulls in lists, event time, finiteness,
    list length) in precedence order; returns the surviving rows, with ``dense`` filled
    (float32, defaults, ``log1p``); ``columns`` stay raw (the filter reads them)."""
    n = len(dec.index)
    if n == 0:
        return Decoded(dec.index, dec.columns,
                       {f.name: np.empty(0, np.float32) for f in plan.fields if f.role is FieldRole.DENSE}, dec.ids)
    bad = np.zeros(n, dtype=bool)

    def reject(mask: np.ndarray, reason: Reason, detail) -> None:
        new = mask & ~bad
        for j in np.flatnonzero(new):
            rejects.add(int(dec.index[j]), reason, detail(int(j)))
        bad[new] = True

    label = dec.columns[plan.label]
    lab_null = _nulls(label)
    lab = _np(label, 0.0)
    reject(lab_null, Reason.MISSING_LABEL, lambda j: f"label field {plan.label!r} is missing or null")
    with np.errstate(invalid="ignore"):
        out_of_range = ~((lab >= 0.0) & (lab <= 1.0))
    reject(out_of_range, Reason.BAD_LABEL,
           lambda j: f"label {plan.label!r} = {lab[j]!r}; expected a number in [0, 1]")

    for f in plan.fields:
        if f.multi:
            col = dec.columns[f.name]
            flat = pc.list_flatten(col)
            if flat.null_count:
                parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
                hit = np.zeros(n, dtype=bool)
                hit[parents[_nulls(flat)]] = True
                reject(hit, Reason.WRONG_TYPE,
                       lambda j, f=f: f"field {f.name!r}: null inside the list; expected only {f.arrow_type.value_type} values")

    if plan.event_time:
        et = dec.columns[plan.event_time]
        etv = _np(et, 0)
        reject(etv < 0, Reason.BAD_EVENT_TIME,
               lambda j: f"event time {plan.event_time!r} = {etv[j]}; expected milliseconds since the epoch >= 0")

    dense_out: dict[str, np.ndarray] = {}
    for f in plan.fields:
        if f.role is not FieldRole.DENSE:
            continue
        col = dec.columns[f.name]
        with np.errstate(over="ignore", invalid="ignore"):
            v = _np(col, f.default).astype(np.float32)
        if not f.allow_nan:
            reject(~np.isfinite(v), Reason.NON_FINITE,
                   lambda j, f=f, col=col: f"dense {f.name!r} = {col[j].as_py()!r} is not finite as float32; "
                   "set allow_nan = true to keep such values")
        if f.log1p:
            with np.errstate(invalid="ignore"):
                v = np.sign(v) * np.log1p(np.abs(v))
        dense_out[f.name] = v

    for f in plan.fields:
        if f.multi:
            lengths = _np(pc.list_value_length(dec.columns[f.name]), 0)
            reject(lengths > f.max_values, Reason.TOO_MANY_VALUES,
                   lambda j, f=f, lengths=lengths: f"field {f.name!r} has {lengths[j]} values; max_values = {f.max_values}")

    return Decoded(dec.index, dec.columns, dense_out, dec.ids).take(~bad)
