"""Derived fields: the ``[schema] derive`` expressions evaluated over decoded columns.

Runs after the format decoder and before ``decode.validate``, so a derived label, dense
feature or event time is validated like a raw one (a missing derived label is
``missing_label``, a derived label of 3 is ``bad_label``, ...). Derived fields are
computed in ``DecodePlan.derived`` order; an expression reads raw fields (as float64) and
earlier derived fields (with the value they are stored with). A derived int sparse
feature or event time is rounded down to int64; a value that is then not finite or
outside int64 cannot be an id or a time, so the row is rejected (``wrong_type`` /
``bad_event_time``) after the validate checks, which take precedence.

Example:
    >>> import pyarrow as pa
    >>> from transforms.config import DenseFeature, SchemaConfig
    >>> from transforms.filters import compile_filter, FilterConfig
    >>> schema = SchemaConfig(label="liked", dense=(DenseFeature("rating"),), derive={"liked": "rating >= 4"})
    >>> plan = DecodePlan.build(schema, compile_filter(FilterConfig()))
    >>> dec, late = derive(plan, Decoded(np.arange(3), {"rating": pa.array([5.0, 2.0, None])}))
    >>> dec.columns["liked"].to_pylist(), late
    ([1.0, 0.0, None], {})
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.decode import Decoded, DecodePlan, FieldRole
from transforms.elements import Reason
from transforms.expressions import Column

__all__ = ["derive"]

_I64_BOUND = float(1 << 63)


def _as_column(arr: pa.Array) -> Column:
    valid = np.ones(len(arr), dtype=bool) if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    filled = pc.fill_null(arr, 0) if arr.null_count else arr
    return filled.to_numpy(zero_copy_only=False).astype(np.float64, copy=False), valid


def derive(plan: DecodePlan, dec: Decoded) -> tuple[Decoded, dict[int, tuple[Reason, str]]]:
    """``dec`` with a column per derived field, and the rows to reject once ``validate``
    has run: ``{source row index: (reason, detail)}``."""
    if not plan.derived:
        return dec, {}
    n = len(dec.index)
    by_name = {f.name: f for f in plan.fields}
    env: dict[str, Column] = {}
    cols = dict(dec.columns)
    late: dict[int, tuple[Reason, str]] = {}
    for name in plan.derived:
        f = by_name[name]
        inputs = {}
        for ref in f.expr.fields:
            if ref not in env:
                env[ref] = _as_column(cols[ref])
            inputs[ref] = env[ref]
        values, valid = f.expr.evaluate(inputs, n)
        if f.arrow_type == pa.int64():
            with np.errstate(invalid="ignore"):
                values = np.floor(values)
                fits = np.isfinite(values) & (values >= -_I64_BOUND) & (values < _I64_BOUND)
            reason = Reason.BAD_EVENT_TIME if f.role is FieldRole.EVENT_TIME else Reason.WRONG_TYPE
            for j in np.flatnonzero(valid & ~fits):
                detail = (f"derived field {name!r} = {f.expr.text!r} is {float(values[j])!r}; "
                          "expected a finite value in int64 range")
                late[int(dec.index[j])] = (reason, detail)
            valid = valid & fits
            cols[name] = pa.array(np.where(valid, values, 0.0).astype(np.int64), type=pa.int64(), mask=~valid)
        else:
            cols[name] = pa.array(values, type=pa.float64(), mask=~valid)
        env[name] = (np.where(valid, values, 0.0), valid)
    return Decoded(dec.index, cols, dec.dense, dec.ids), late
