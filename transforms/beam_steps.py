"""Thin Beam wrappers around the pure transform chain.

* ``ProcessBatches(spec, mappings_dir)``: ``PCollection[SourceBatch] ->
  PCollection[ProcessedBatch]``, one output per input (``process.process_batch``). Each
  DoFn instance loads the newest ``MappingSet`` from ``mappings_dir`` in ``setup()`` (the
  default modulo set, version 0, when the directory has none or is None) and looks for a
  newer version at most every ``reload_every_s`` seconds, so an online re-fit that saves
  version N+1 is picked up mid-stream. Nothing is shared between steps or workers
  except the spec (pickled with the DoFn) and files: it runs on any Beam runner.
* ``SourceBatchCoder`` / ``ProcessedBatchCoder`` (registered on import): Arrow IPC for the
  record batches plus a small header, instead of pickle (measured: a 4096-row batch round
  trip costs ~0.4-1 ms this way against ~2-3 ms pickled).
* ``ApplyPlugins(plugins)``: ``PCollection[ProcessedBatch] -> PCollection[ProcessedBatch]``
  through user ``PTransform[RecordBatch -> RecordBatch]`` plugins, with the accounting
  carried in schema metadata (``plugin_api``); after each plugin a check step raises a
  ``PluginError`` naming it if it broke the metadata or the pipeline's columns.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from engine.errors import PluginError
from streams.records import SourceBatch
from transforms.elements import ProcessedBatch
from transforms.mappers import MappingSet
from transforms.plugin_api import (
    _dead_from_bytes, _dead_to_bytes, check_plugin_output, from_record_batch, to_record_batch,
)
from transforms.process import TransformSpec, output_schema, process_batch

__all__ = [
    "ProcessBatches", "ApplyPlugins", "load_mappings", "reload_due", "SourceBatchCoder", "ProcessedBatchCoder",
]

_EMPTY = pa.schema([])


def load_mappings(spec: TransformSpec, mappings_dir: str | None, default_mapper: str = "modulo") -> MappingSet:
    """The newest stored set in ``mappings_dir``, else the default set (version 0)."""
    if mappings_dir and MappingSet.versions(mappings_dir):
        ms = MappingSet.load(mappings_dir)
    else:
        ms = MappingSet.default(spec.schema, default_mapper)
    ms.check_schema(spec.schema)
    return ms


def reload_due(now_s: float, last_check_s: float, every_s: float) -> bool:
    """Whether a DoFn should look for a newer mapping version now (pure; clock injected)."""
    return now_s - last_check_s >= every_s


class _ProcessFn(beam.DoFn):
    def __init__(self, spec: TransformSpec, mappings_dir: str | None, reload_every_s: float, default_mapper: str):
        self._spec = spec
        self._dir = mappings_dir
        self._every_s = reload_every_s
        self._default = default_mapper
        self._mappings: MappingSet | None = None
        self._checked_s = 0.0

    def setup(self):
        self._mappings = load_mappings(self._spec, self._dir, self._default)
        self._checked_s = time.monotonic()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self._dir or not reload_due(now, self._checked_s, self._every_s):
            return
        self._checked_s = now
        versions = MappingSet.versions(self._dir)
        if versions and versions[-1] > self._mappings.version:
            self._mappings = load_mappings(self._spec, self._dir, self._default)

    def process(self, sb):
        self._maybe_reload()
        yield process_batch(sb, self._spec, self._mappings)


class ProcessBatches(beam.PTransform):
    """``PCollection[SourceBatch] -> PCollection[ProcessedBatch]`` (see the module docstring)."""

    def __init__(self, spec: TransformSpec, mappings_dir: str | None = None, *, reload_every_s: float = 10.0,
                 default_mapper: str = "modulo"):
        super().__init__()
        if reload_every_s < 0:
            raise ValueError(f"reload_every_s must be >= 0, got {reload_every_s}")
        self._fn = _ProcessFn(spec, mappings_dir, reload_every_s, default_mapper)

    def expand(self, pcoll):
        return pcoll | "ProcessBatch" >> beam.ParDo(self._fn)


class ApplyPlugins(beam.PTransform):
    """Run user plugins in order over each batch; ``plugins`` is ``[(name, transform)]``.

    ``required`` is the schema every plugin output must still contain (default: none
    checked beyond the accounting metadata); pass ``output_schema(spec, mappings)``.
    Rows a plugin drops are counted as filtered. With no plugins this is the identity.
    """

    def __init__(self, plugins: Sequence[tuple[str, beam.PTransform]], required=None):
        super().__init__()
        names = [n for n, _ in plugins]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"plugin names must be unique (they label Beam steps); repeated: {dup}")
        for name, t in plugins:
            if not isinstance(t, beam.PTransform):
                raise PluginError(f"plugin {name!r} is {type(t).__name__}, not a beam.PTransform; wrap a "
                                  "function with transforms.plugin_api.map_batches")
        self._plugins = list(plugins)
        self._required = required

    @staticmethod
    def required_schema(spec: TransformSpec, mappings: MappingSet):
        return output_schema(spec, mappings)

    def expand(self, pcoll):
        if not self._plugins:
            return pcoll
        required = self._required
        rbs = pcoll | "ToRecordBatch" >> beam.Map(to_record_batch)
        for name, transform in self._plugins:
            rbs = rbs | f"Plugin[{name}]" >> transform
            rbs = rbs | f"Check[{name}]" >> beam.Map(
                lambda rb, name=name: check_plugin_output(rb, name, required if required is not None else _EMPTY))
        last = self._plugins[-1][0]
        return rbs | "FromRecordBatch" >> beam.Map(from_record_batch, last)


# ------------------------------------------------------------------------------ coders

_LEN = struct.Struct("<Q")


def _pack(*parts: bytes) -> bytes:
    return b"".join(_LEN.pack(len(p)) + p for p in parts)


def _unpack(data: bytes) -> list[memoryview]:
    out, pos, view = [], 0, memoryview(data)
    while pos < len(view):
        (n,) = _LEN.unpack_from(view, pos)
        out.append(view[pos + 8: pos + 8 + n])
        pos += 8 + n
    return out


def _ipc(rb: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as w:
        w.write_batch(rb)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: memoryview) -> pa.RecordBatch:
    batches = list(pa.ipc.open_stream(pa.py_buffer(data)))
    if len(batches) != 1:
        raise ValueError(f"corrupt encoded batch: {len(batches)} record batches in its IPC stream, expected 1")
    return batches[0]


class SourceBatchCoder(beam.coders.Coder):
    """``SourceBatch`` <-> bytes: JSON header + Arrow IPC of the records."""

    def encode(self, sb: SourceBatch) -> bytes:
        head = json.dumps([sb.topic, sb.partition, sb.start_offset, sb.end_offset, sb.partition_start]).encode()
        return _pack(head, _ipc(sb.records))

    def decode(self, data: bytes) -> SourceBatch:
        head, rec = _unpack(data)
        topic, part, start, end, pstart = json.loads(bytes(head))
        return SourceBatch(topic, part, start, end, pstart, _from_ipc(rec))

    def is_deterministic(self) -> bool:
        return False


class ProcessedBatchCoder(beam.coders.Coder):
    """``ProcessedBatch`` <-> bytes: JSON header + Arrow IPC of rows and dead letters +
    the filtered offsets as little-endian int64."""

    def encode(self, pb: ProcessedBatch) -> bytes:
        head = json.dumps([pb.topic, pb.partition, pb.start_offset, pb.end_offset, pb.partition_start, pb.read,
                           pb.mapping_version]).encode()
        return _pack(head, _ipc(pb.batch), _dead_to_bytes(pb.dead_letters),
                     np.ascontiguousarray(pb.filtered_offsets, dtype="<i8").tobytes())

    def decode(self, data: bytes) -> ProcessedBatch:
        head, batch, dead, filtered = _unpack(data)
        topic, part, start, end, pstart, read, version = json.loads(bytes(head))
        return ProcessedBatch(topic, part, start, end, pstart, _from_ipc(batch), _dead_from_bytes(bytes(dead)),
                              np.frombuffer(bytes(filtered), dtype="<i8").astype(np.int64), read, version)

    def is_deterministic(self) -> bool:
        return False


beam.coders.registry.register_coder(SourceBatch, SourceBatchCoder)
beam.coders.registry.register_coder(ProcessedBatch, ProcessedBatchCoder)
