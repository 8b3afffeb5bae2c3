"""The whole transform chain as one pure function: ``SourceBatch -> ProcessedBatch``.

decode -> derive -> validate -> filter -> project -> hash ids (and crosses) -> map ids to
rows -> assemble.

Contract of ``process_batch``:

* Pure and deterministic: the output depends only on its arguments.
* Exactly one ``ProcessedBatch`` per ``SourceBatch``, same topic/partition/range;
  ``read == batch.num_rows + len(dead_letters) + len(filtered_offsets)``.
* Kept rows and dead letters are in source order.
* The output schema is ``output_schema(spec, mappings)``: fixed for a config and the
  lookups of its mappers (also for an empty batch). Columns, in order: the label
  (float32), each dense feature (float32), each sparse feature's table rows (int64;
  list<int64> when multi-valued or when its mapper has ``lookups == 2``: the rows of
  each value, interleaved, for the embedding bag to sum), each ``<feature>.id`` (raw
  64-bit ids, int64 or list<int64>), ``_offset`` and ``_event_time_ms`` (int64).

Example:
    >>> from transforms.config import DenseFeature, SchemaConfig, SparseFeature
    >>> schema = SchemaConfig(dense=(DenseFeature("x"),), sparse=(SparseFeature("c", rows=10),))
    >>> spec = TransformSpec.from_sections(schema, FilterConfig(), max_message_bytes=1 << 20)
    >>> sb = source_batch([b'{"label": 1, "x": 2.5, "c": "a"}', b'oops'])
    >>> pb = process_batch(sb, spec, MappingSet.default(schema))
    >>> pb.batch.num_rows, [d.reason.value for d in pb.dead_letters]
    (1, ['malformed_json'])
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.records import RAW_SCHEMA, SourceBatch, csv_header_of
from transforms.config import EventFormat, FilterConfig, SchemaConfig
from transforms.decode import (
    Decoded,
    DecodePlan,
    FieldRole,
    FieldSource,
    Rejects,
    validate,
)
from transforms.decode_csv import decode_csv
from transforms.decode_json import decode_json
from transforms.decode_tsv import decode_tsv
from transforms.derive import derive
from transforms.elements import (
    EVENT_TIME_COLUMN,
    OFFSET_COLUMN,
    DeadLetter,
    ProcessedBatch,
    Reason,
    id_column,
)
from transforms.errors import MappingError
from transforms.filters import FilterPlan, compile_filter
from transforms.hashing import hash_cross, hash_ints, hash_strings
from transforms.mappers import MappingSet

__all__ = ["TransformSpec", "process_batch", "output_schema", "source_batch", "bench_process"]


@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """Everything the chain needs from config, parsed once; picklable (Beam ships it)."""

    schema: SchemaConfig
    filter: FilterPlan
    max_message_bytes: int
    plan: DecodePlan = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {self.max_message_bytes}")
        object.__setattr__(self, "plan", DecodePlan.build(self.schema, self.filter))

    @classmethod
    def from_sections(cls, schema: SchemaConfig, filter_cfg: FilterConfig, max_message_bytes: int) -> "TransformSpec":
        return cls(schema, compile_filter(filter_cfg), max_message_bytes)

    @classmethod
    def from_config(cls, cfg) -> "TransformSpec":
        """From a ``HeadraceConfig`` (its schema, filter and source.max_message_bytes)."""
        return cls.from_sections(cfg.schema, cfg.filter, cfg.source.max_message_bytes)


def output_schema(spec: TransformSpec, mappings: MappingSet) -> pa.Schema:
    """The fixed schema of every ``ProcessedBatch.batch`` for this spec and mapping set."""
    s = spec.schema
    fields = [pa.field(s.label, pa.float32(), nullable=False)]
    fields += [pa.field(d.name, pa.float32(), nullable=False) for d in s.dense]
    for f in s.sparse:
        listed = f.multi or mappings[f.name].lookups > 1
        fields.append(pa.field(f.name, pa.list_(pa.int64()) if listed else pa.int64(), nullable=False))
    for f in s.sparse:
        fields.append(pa.field(id_column(f.name), pa.list_(pa.int64()) if f.multi else pa.int64(), nullable=False))
    fields += [pa.field(OFFSET_COLUMN, pa.int64(), nullable=False),
               pa.field(EVENT_TIME_COLUMN, pa.int64(), nullable=False)]
    return pa.schema(fields)


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int64()))


def _checked_rows(feature: str, mapper, ids: np.ndarray) -> np.ndarray:
    rows = mapper.map(ids)
    want = (ids.shape[0],) if mapper.lookups == 1 else (mapper.lookups, ids.shape[0])
    if rows.shape != want or rows.dtype != np.int64:
        raise MappingError(f"mapper {mapper.name!r} for {feature!r} returned {rows.dtype}{rows.shape}, expected int64{want}")
    if rows.size and (rows.min() < 0 or rows.max() >= mapper.rows):
        raise MappingError(f"mapper {mapper.name!r} for {feature!r} returned rows outside [0, {mapper.rows})")
    return rows


def _single_ids(f, dec: Decoded, ids_of: dict[str, np.ndarray]) -> np.ndarray:
    if f.source is FieldSource.CROSS:
        return hash_cross([ids_of[name] for name in f.cross])
    if f.name in dec.ids:
        return dec.ids[f.name]
    col = dec.columns[f.name]
    return hash_strings(col) if f.arrow_type == pa.string() else hash_ints(col)


def _sparse(f, dec: Decoded, mapper, ids_of: dict[str, np.ndarray]) -> tuple[pa.Array, pa.Array]:
    lookups = mapper.lookups
    if not f.multi:
        ids = ids_of[f.name] = _single_ids(f, dec, ids_of)
        rows = _checked_rows(f.name, mapper, ids)
        if lookups == 1:
            return pa.array(rows, type=pa.int64()), pa.array(ids, type=pa.int64())
        offs = np.arange(0, (len(ids) + 1) * lookups, lookups, dtype=np.int64)
        return _list(offs, rows.T.reshape(-1)), pa.array(ids, type=pa.int64())
    col = dec.columns[f.name]
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    offs = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offs[1:])
    flat = pc.list_flatten(col)
    ids = hash_strings(flat) if f.arrow_type.value_type == pa.string() else hash_ints(flat)
    rows = _checked_rows(f.name, mapper, ids)
    rows_flat = rows if lookups == 1 else rows.T.reshape(-1)
    return _list(offs * lookups, rows_flat), _list(offs, ids)


def _assemble(spec: TransformSpec, mappings: MappingSet, dec: Decoded, offsets: np.ndarray,
              timestamps: np.ndarray) -> pa.RecordBatch:
    plan = spec.plan
    schema = output_schema(spec, mappings)
    label = pc.fill_null(dec.columns[plan.label], 0.0).to_numpy(zero_copy_only=False).astype(np.float32)
    arrays = [pa.array(label, type=pa.float32())]
    arrays += [pa.array(dec.dense[d.name], type=pa.float32()) for d in spec.schema.dense]
    ids_arrays = []
    ids_of: dict[str, np.ndarray] = {}  # single-valued features' ids, for the crosses after them
    for f in plan.fields:
        if f.role is FieldRole.SPARSE:
            rows, ids = _sparse(f, dec, mappings[f.name], ids_of)
            arrays.append(rows)
            ids_arrays.append(ids)
    arrays += ids_arrays
    src_ts = timestamps[dec.index]
    if plan.event_time:
        et = dec.columns[plan.event_time]
        event_ms = et.to_numpy(zero_copy_only=False) if et.null_count == 0 else \
            np.where(et.is_null().to_numpy(zero_copy_only=False), src_ts, pc.fill_null(et, 0).to_numpy())
    else:
        event_ms = src_ts
    arrays.append(pa.array(offsets[dec.index], type=pa.int64()))
    arrays.append(pa.array(np.asarray(event_ms, dtype=np.int64), type=pa.int64()))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _decode(spec: TransformSpec, rec: pa.RecordBatch, cand: np.ndarray, rejects: Rejects) -> Decoded:
    """Format decode of the event fields, then the derived fields, then ``validate``."""
    plan = spec.plan
    values = rec.column("value")
    if plan.format is EventFormat.JSON:
        dec = decode_json(plan.raw, values, cand, rejects)
    elif plan.format is EventFormat.TSV:
        dec = decode_tsv(plan.raw, values, cand, rejects)
    else:
        dec = decode_csv(plan.raw, values, cand, rejects, header=csv_header_of(rec))
    dec, late = derive(plan, dec)
    dec = validate(plan, dec, rejects)
    if late:
        hit = np.isin(dec.index, np.fromiter(late, dtype=np.int64, count=len(late)))
        for i in dec.index[hit]:
            rejects.add(int(i), *late[int(i)])
        dec = dec.take(~hit)
    return dec


def process_batch(sb: SourceBatch, spec: TransformSpec, mappings: MappingSet) -> ProcessedBatch:
    """Run the whole chain on one source batch (see the module docstring)."""
    mappings.check_schema(spec.schema)
    rec = sb.records
    n = rec.num_rows
    values = rec.column("value")
    offsets = rec.column("offset").to_numpy(zero_copy_only=False)
    timestamps = rec.column("timestamp_ms").to_numpy(zero_copy_only=False)
    rejects = Rejects()

    lengths = pc.binary_length(values)
    len_np = pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False)
    empty = len_np == 0
    oversize = len_np > spec.max_message_bytes
    for i in np.flatnonzero(empty):
        rejects.add(int(i), Reason.EMPTY_MESSAGE, "null or zero-byte message")
    for i in np.flatnonzero(oversize):
        rejects.add(int(i), Reason.OVERSIZE,
                    f"{len_np[i]} bytes > source.max_message_bytes = {spec.max_message_bytes}; raise it to accept")
    cand = np.flatnonzero(~(empty | oversize)).astype(np.int64)

    dec = _decode(spec, rec, cand, rejects)

    filtered = np.empty(0, dtype=np.int64)
    if spec.filter.active and len(dec.index):
        keep = spec.filter.keep_mask(dec.columns, len(dec.index))
        if spec.filter.negative_keep_rate < 1.0:
            labels = pc.fill_null(dec.columns[spec.plan.label], 1.0).to_numpy(zero_copy_only=False)
            keep &= spec.filter.negatives_kept(labels, values.take(pa.array(dec.index)))
        filtered = offsets[dec.index[~keep]].astype(np.int64)
        dec = dec.take(keep)

    batch = _assemble(spec, mappings, dec, offsets, timestamps)
    dead = tuple(
        DeadLetter(sb.topic, sb.partition, int(offsets[i]), int(timestamps[i]), stage, reason, detail,
                   values[i].as_py() or b"")
        for i, (stage, reason, detail) in sorted(rejects.rows.items())
    )
    if batch.num_rows + len(dead) + len(filtered) != n:
        raise AssertionError(
            f"accounting broken: {batch.num_rows} rows + {len(dead)} dead + {len(filtered)} filtered != {n} read (a bug)"
        )
    return ProcessedBatch(sb.topic, sb.partition, sb.start_offset, sb.end_offset, sb.partition_start,
                          batch, dead, filtered, n, mappings.version)


def source_batch(values: Sequence[bytes | None], *, topic: str = "t", partition: int = 0, start_offset: int = 0,
                 timestamps_ms: Sequence[int] | None = None) -> SourceBatch:
    """A ``SourceBatch`` of consecutive offsets from ``start_offset`` (tests, benchmarks)."""
    n = len(values)
    ts = list(timestamps_ms) if timestamps_ms is not None else [-1] * n
    rec = pa.RecordBatch.from_arrays(
        [pa.array(range(start_offset, start_offset + n), pa.int64()), pa.array(ts, pa.int64()),
         pa.array(values, pa.binary())], schema=RAW_SCHEMA)
    return SourceBatch(topic, partition, start_offset, start_offset + n, start_offset, rec)


def bench_process(events: Sequence[bytes], spec: TransformSpec, mappings: MappingSet, repeats: int = 3,
                  batch_size: int = 4096) -> float:
    """Events per second of ``process_batch`` over ``events`` cut into batches of
    ``batch_size`` (best of ``repeats`` passes; building the batches is not timed)."""
    batches = [source_batch(events[i:i + batch_size], start_offset=i) for i in range(0, len(events), batch_size)]
    process_batch(batches[0], spec, mappings)  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            process_batch(b, spec, mappings)
        best = min(best, time.perf_counter() - t0)
    return len(events) / best
