"""What a user plugin sees, and helpers that keep the batch's accounting intact.

A plugin is a ``beam.PTransform`` from ``PCollection[pa.RecordBatch]`` to
``PCollection[pa.RecordBatch]`` that emits exactly one batch per input batch. Each batch is
one ``ProcessedBatch`` (``to_record_batch``): the kept rows, with the source range, read
count, mapping version, dead letters, filtered offsets and the kept offsets in the schema
metadata (keys ``headrace.*``). Plugins may drop rows (they then count as filtered), change
values and add columns; they must keep the metadata and the pipeline's columns (names and
types). ``RecordBatch.filter/take/slice/append_column/set_column/select`` keep metadata;
building a new batch (``from_pydict``, ``from_pandas``) does not: use ``with_column`` or
``map_batches``, which restore it.

Example:
    >>> import pyarrow.compute as pc
    >>> def clip(rb):  # a plugin body: clip dense feature "x" at 10
    ...     return with_column(rb, "x", pc.min_element_wise(rb.column("x"), 10.0))
    >>> plugin = map_batches(clip, name="clip-x")  # a beam.PTransform, ready for config

``map_batches(fn)`` also turns an exception of ``fn`` on a batch into dead letters (reason
``plugin_error``, stage ``plugin``, raw = the row as JSON) instead of failing the pipeline,
unless ``on_error=OnError.RAISE``. An exception in any other plugin fails the pipeline
(nothing is lost: the cache did not advance, a restart replays the batch).
"""

from __future__ import annotations

import enum
import io
from typing import Callable

import apache_beam as beam
import numpy as np
import orjson
import pyarrow as pa

from transforms.elements import OFFSET_COLUMN, DeadLetter, ProcessedBatch, Reason, Stage
from transforms.errors import PluginError

__all__ = [
    "META_PREFIX", "to_record_batch", "from_record_batch", "check_plugin_output", "with_column",
    "map_batches", "OnError", "dead_letter_rows",
]

META_PREFIX = b"headrace."
_K = {k: META_PREFIX + k.encode() for k in (
    "topic", "partition", "start_offset", "end_offset", "partition_start", "read", "mapping_version",
    "dead_letters", "filtered", "kept")}

_DEAD_SCHEMA = pa.schema([
    ("topic", pa.string()), ("partition", pa.int64()), ("offset", pa.int64()), ("timestamp_ms", pa.int64()),
    ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.binary()),
])


def _dead_to_bytes(dead: tuple[DeadLetter, ...] | list[DeadLetter]) -> bytes:
    cols = list(zip(*[(d.topic, d.partition, d.offset, d.timestamp_ms, d.stage.value, d.reason.value, d.detail, d.raw)
                      for d in dead])) or [[]] * len(_DEAD_SCHEMA)
    rb = pa.RecordBatch.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, _DEAD_SCHEMA)], schema=_DEAD_SCHEMA)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, _DEAD_SCHEMA) as w:
        w.write_batch(rb)
    return sink.getvalue()


def _dead_from_bytes(data: bytes) -> tuple[DeadLetter, ...]:
    table = pa.ipc.open_stream(data).read_all()
    return tuple(
        DeadLetter(r["topic"], r["partition"], r["offset"], r["timestamp_ms"], Stage(r["stage"]), Reason(r["reason"]),
                   r["detail"], r["raw"])
        for r in table.to_pylist()
    )


def _i64(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<i8").tobytes()


def to_record_batch(pb: ProcessedBatch) -> pa.RecordBatch:
    """The batch a plugin sees: ``pb.batch`` with the accounting in its schema metadata."""
    meta = dict(pb.batch.schema.metadata or {})
    meta.update({
        _K["topic"]: pb.topic.encode(), _K["partition"]: str(pb.partition).encode(),
        _K["start_offset"]: str(pb.start_offset).encode(), _K["end_offset"]: str(pb.end_offset).encode(),
        _K["partition_start"]: str(pb.partition_start).encode(), _K["read"]: str(pb.read).encode(),
        _K["mapping_version"]: str(pb.mapping_version).encode(),
        _K["dead_letters"]: _dead_to_bytes(pb.dead_letters),
        _K["filtered"]: _i64(pb.filtered_offsets),
        _K["kept"]: _i64(pb.batch.column(OFFSET_COLUMN).to_numpy(zero_copy_only=False)),
    })
    return pb.batch.replace_schema_metadata(meta)


def _meta(rb: pa.RecordBatch, plugin: str) -> dict[bytes, bytes]:
    meta = rb.schema.metadata or {}
    missing = [k.decode() for k in _K.values() if k not in meta]
    if missing:
        raise PluginError(
            f"plugin {plugin!r} returned a batch without the headrace accounting metadata (missing "
            f"{missing}); the batch's events would be lost. Fix: derive the output from the input "
            "batch (rb.filter, rb.append_column, rb.set_column) or use transforms.plugin_api.with_column "
            "/ map_batches, which keep it"
        )
    return meta


def check_plugin_output(rb: pa.RecordBatch, plugin: str, required: pa.Schema) -> pa.RecordBatch:
    """PluginError naming ``plugin`` unless ``rb`` is a batch with the metadata and every
    field of ``required`` (name and type). Returns ``rb``."""
    if not isinstance(rb, pa.RecordBatch):
        raise PluginError(f"plugin {plugin!r} emitted {type(rb).__name__}; plugins must emit pyarrow.RecordBatch")
    _meta(rb, plugin)
    for f in required:
        i = rb.schema.get_field_index(f.name)
        if i < 0:
            raise PluginError(f"plugin {plugin!r} dropped column {f.name!r}; the cache and trainer need it. "
                              "Keep the pipeline's columns (add new ones beside them)")
        if rb.schema.field(i).type != f.type:
            raise PluginError(f"plugin {plugin!r} changed column {f.name!r} from {f.type} to "
                              f"{rb.schema.field(i).type}; keep the type (cast back)")
    return rb


def from_record_batch(rb: pa.RecordBatch, plugin: str = "<plugins>") -> ProcessedBatch:
    """The ``ProcessedBatch`` of a plugin's output: rows the plugins dropped become
    filtered offsets, so ``read == rows + dead + filtered`` still holds."""
    meta = _meta(rb, plugin)
    kept_in = np.frombuffer(meta[_K["kept"]], dtype="<i8")
    out_offsets = rb.column(OFFSET_COLUMN).to_numpy(zero_copy_only=False) if rb.num_rows else np.empty(0, np.int64)
    extra = np.setdiff1d(out_offsets, kept_in)
    if extra.size or len(np.unique(out_offsets)) != len(out_offsets):
        raise PluginError(
            f"plugin {plugin!r} emitted rows whose {OFFSET_COLUMN} is not one of its input rows "
            f"(e.g. {extra[:3].tolist()}) or repeated a row; plugins may drop or change rows, not add them"
        )
    dropped = np.setdiff1d(kept_in, out_offsets)
    filtered = np.concatenate([np.frombuffer(meta[_K["filtered"]], dtype="<i8"), dropped]).astype(np.int64)
    clean = {k: v for k, v in meta.items() if not k.startswith(META_PREFIX)}
    return ProcessedBatch(
        topic=meta[_K["topic"]].decode(), partition=int(meta[_K["partition"]]),
        start_offset=int(meta[_K["start_offset"]]), end_offset=int(meta[_K["end_offset"]]),
        partition_start=int(meta[_K["partition_start"]]),
        batch=rb.replace_schema_metadata(clean or None),
        dead_letters=_dead_from_bytes(meta[_K["dead_letters"]]),
        filtered_offsets=np.sort(filtered), read=int(meta[_K["read"]]),
        mapping_version=int(meta[_K["mapping_version"]]),
    )


def with_column(rb: pa.RecordBatch, name: str, values: pa.Array | np.ndarray | list) -> pa.RecordBatch:
    """``rb`` with column ``name`` replaced (same position) or appended; metadata kept."""
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    i = rb.schema.get_field_index(name)
    if i >= 0:
        out = rb.set_column(i, pa.field(name, arr.type), arr)
    else:
        out = rb.append_column(pa.field(name, arr.type), arr)
    return out.replace_schema_metadata(rb.schema.metadata)


def dead_letter_rows(rb: pa.RecordBatch, mask: np.ndarray, detail: str) -> pa.RecordBatch:
    """``rb`` without the rows of ``mask``, which become dead letters (plugin_error, stage
    plugin, raw = the row as JSON) in the metadata."""
    meta = _meta(rb, "<dead_letter_rows>")
    mask = np.asarray(mask, dtype=bool)
    topic, part = meta[_K["topic"]].decode(), int(meta[_K["partition"]])
    rows = rb.filter(pa.array(mask)).to_pylist()
    new = [DeadLetter(topic, part, int(r[OFFSET_COLUMN]), int(r.get("_event_time_ms", -1)), Stage.PLUGIN,
                      Reason.PLUGIN_ERROR, detail, orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY))
           for r in rows]
    dead = _dead_from_bytes(meta[_K["dead_letters"]]) + tuple(new)
    kept = np.frombuffer(meta[_K["kept"]], dtype="<i8")
    kept = np.setdiff1d(kept, [d.offset for d in new])
    meta = dict(meta)
    meta[_K["dead_letters"]] = _dead_to_bytes(sorted(dead, key=lambda d: d.offset))
    meta[_K["kept"]] = _i64(kept)
    return rb.filter(pa.array(~mask)).replace_schema_metadata(meta)


class OnError(enum.Enum):
    DEAD_LETTER = "dead_letter"  # the batch's rows become plugin_error dead letters
    RAISE = "raise"  # fail the pipeline


class _MapBatchesFn(beam.DoFn):
    def __init__(self, fn: Callable[[pa.RecordBatch], pa.RecordBatch], name: str, on_error: OnError):
        self._fn, self._name, self._on_error = fn, name, on_error

    def process(self, rb: pa.RecordBatch):
        try:
            out = self._fn(rb)
        except Exception as exc:  # a user function: any failure must become data, not loss
            if self._on_error is OnError.RAISE:
                raise PluginError(f"plugin {self._name!r} failed: {type(exc).__name__}: {exc}") from exc
            yield dead_letter_rows(rb, np.ones(rb.num_rows, dtype=bool),
                                   f"plugin {self._name!r} raised {type(exc).__name__}: {exc}")
            return
        if not isinstance(out, pa.RecordBatch):
            raise PluginError(f"plugin {self._name!r} returned {type(out).__name__}; return a pyarrow.RecordBatch")
        if not (out.schema.metadata or {}).get(_K["kept"]):
            out = out.replace_schema_metadata({**(out.schema.metadata or {}), **(rb.schema.metadata or {})})
        yield out


class map_batches(beam.PTransform):  # noqa: N801 - reads as a function in plugin code
    """A plugin from a function ``RecordBatch -> RecordBatch`` (see the module docstring)."""

    def __init__(self, fn: Callable[[pa.RecordBatch], pa.RecordBatch], name: str | None = None,
                 on_error: OnError = OnError.DEAD_LETTER):
        super().__init__(label=name)
        self._fn = fn
        self._name = name or getattr(fn, "__qualname__", repr(fn))
        self._on_error = on_error

    def expand(self, pcoll):
        return pcoll | beam.ParDo(_MapBatchesFn(self._fn, self._name, self._on_error))
