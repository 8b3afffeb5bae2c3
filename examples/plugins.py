"""An example user plugin: clip dense (floating-point) features into a range.

A plugin is any ``beam.PTransform`` from ``PCollection[pa.RecordBatch]`` to
``PCollection[pa.RecordBatch]``. Change columns with ``set_column``/``append_column`` and
drop rows with ``filter``: these keep the batch's schema metadata, which carries
headrace's accounting through your transform.

Use it from config::

    [pipeline]
    plugins = ["examples.plugins:ClipDense"]   # or the entry point "example-clip-dense"
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["ClipDense", "clip_dense"]


def clip_dense(batch: pa.RecordBatch, low: float, high: float, exclude: tuple[str, ...]) -> pa.RecordBatch:
    """Clip every floating-point column not in ``exclude`` to ``[low, high]``."""
    for i, field in enumerate(batch.schema):
        if pa.types.is_floating(field.type) and field.name not in exclude:
            clipped = pc.min_element_wise(pc.max_element_wise(batch.column(i), low), high)
            batch = batch.set_column(i, field, clipped.cast(field.type))
    return batch


class ClipDense(beam.PTransform):
    """Clip dense features to ``[low, high]`` (default [-3, 3]); the label is left alone."""

    def __init__(self, low: float = -3.0, high: float = 3.0, exclude: tuple[str, ...] = ("label",)):
        super().__init__()
        if low > high:
            raise ValueError(f"ClipDense: low {low} > high {high}")
        self.low, self.high, self.exclude = low, high, tuple(exclude)

    def expand(self, batches):
        return batches | "ClipDense" >> beam.Map(clip_dense, self.low, self.high, self.exclude)
