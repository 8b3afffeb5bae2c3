"""TSV decode: one tab-separated line per record, columns named by ``schema.columns``.

A record may end in ``\\n`` or ``\\r\\n`` (dropped); any other newline byte, or a tab count
other than ``len(columns) - 1``, makes it ``bad_tsv_row``. There is no quoting: a field is
the bytes between tabs, and an empty field is missing. Numbers are parsed by Arrow's
string -> float64/int64 cast (so ``nan``/``inf`` parse, and then fail ``non_finite``); a
value that does not parse is ``bad_label`` (label), ``bad_event_time`` (event time) or
``wrong_type`` (anything else).

The rows are parsed in one vectorised ``pyarrow.csv`` call over the joined lines; only a
column whose cast fails is re-checked value by value to find the bad rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from transforms.decode import (
    FLAG_NEWLINE,
    FLAG_NON_ASCII,
    Decoded,
    DecodePlan,
    Rejects,
    join_rows,
    raw_buffers,
    scan_rows,
)
from transforms.elements import Reason

__all__ = ["decode_tsv", "trim_line_end", "read_text_columns", "typed_columns"]


def trim_line_end(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``ends`` without one trailing ``\\n`` or ``\\r\\n`` per row."""
    ends = ends.copy()
    nonempty = ends > starts
    nl = nonempty & (data[np.maximum(ends - 1, 0)] == 10)
    ends[nl] -= 1
    cr = nl & (ends > starts) & (data[np.maximum(ends - 1, 0)] == 13)
    ends[cr] -= 1
    return ends


def _reason_for(plan: DecodePlan, name: str) -> Reason:
    if name == plan.label:
        return Reason.BAD_LABEL
    if name == plan.event_time:
        return Reason.BAD_EVENT_TIME
    return Reason.WRONG_TYPE


def decode_tsv(plan: DecodePlan, values: pa.Array, candidates: np.ndarray, rejects: Rejects) -> Decoded:
    """Parse records ``values[candidates]`` (non-empty, size-checked) as TSV lines."""
    offsets, data = raw_buffers(values)
    starts = offsets[candidates]
    ends = trim_line_end(data, starts, offsets[candidates + 1])
    tabs, flags = scan_rows(data, starts, ends)
    want_tabs = len(plan.columns) - 1
    ok = np.ones(len(candidates), dtype=bool)
    for j in np.flatnonzero((tabs != want_tabs) | (flags != 0)):
        raw = bytes(data[starts[j]:ends[j]])
        if flags[j] & FLAG_NON_ASCII:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as u:
                rejects.add(int(candidates[j]), Reason.NOT_UTF8, f"byte {u.start}: {u.reason}")
                ok[j] = False
                continue
        if flags[j] & FLAG_NEWLINE:
            rejects.add(int(candidates[j]), Reason.BAD_TSV_ROW, "a newline inside the line")
            ok[j] = False
        elif tabs[j] != want_tabs:
            rejects.add(int(candidates[j]), Reason.BAD_TSV_ROW,
                        f"{tabs[j] + 1} tab-separated columns; schema.columns names {len(plan.columns)}")
            ok[j] = False
    cand = candidates[ok]
    if len(cand) == 0:
        return Decoded(cand, {f.name: pa.array([], type=f.arrow_type) for f in plan.fields})
    buf = join_rows(data, starts[ok], ends[ok])
    needed = [f.name for f in plan.fields]
    text = read_text_columns(buf, list(plan.columns), needed, len(cand), pcsv.ParseOptions(
        delimiter="\t", quote_char=False, escape_char=False, double_quote=False, newlines_in_values=False,
        ignore_empty_lines=False))
    return typed_columns(plan, text, cand, rejects)


def read_text_columns(buf: np.ndarray, column_names: list[str], include: list[str], rows: int,
                      parse_options: pcsv.ParseOptions) -> dict[str, pa.Array]:
    """One vectorised ``pyarrow.csv`` parse of ``buf`` (rows checked beforehand to parse
    one per line): columns ``include`` as strings, an empty field null."""
    table = pcsv.read_csv(
        pa.BufferReader(pa.py_buffer(buf)),
        read_options=pcsv.ReadOptions(column_names=column_names, use_threads=False,
                                      block_size=max(1 << 20, len(buf) + 1)),
        parse_options=parse_options,
        convert_options=pcsv.ConvertOptions(
            column_types={name: pa.string() for name in include}, include_columns=include,
            null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True),
    )
    if table.num_rows != rows:
        raise AssertionError(f"delimited parse gave {table.num_rows} rows for {rows} checked records (a bug)")
    return {name: table.column(name).combine_chunks() for name in include}


def typed_columns(plan: DecodePlan, text: dict[str, pa.Array], cand: np.ndarray, rejects: Rejects) -> Decoded:
    """Cast the string columns ``text`` (one per field of ``plan``) of rows ``cand`` to the
    plan's types; a value that does not parse rejects its row (see the module docstring)."""
    bad = np.zeros(len(cand), dtype=bool)
    # a missing label outranks a type error: leave those rows to validate (missing_label)
    label_missing = (text[plan.label].is_null().to_numpy(zero_copy_only=False) if plan.label
                     else np.zeros(len(cand), dtype=bool))
    cols: dict[str, pa.Array] = {}
    for f in plan.fields:
        col = text[f.name]
        if f.arrow_type == pa.string():
            cols[f.name] = col
            continue
        try:
            cols[f.name] = pc.cast(col, f.arrow_type)
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        # rare path: find which values do not parse
        parsed = []
        for j, v in enumerate(col.to_pylist()):
            if v is None:
                parsed.append(None)
                continue
            try:
                parsed.append(pc.cast(pa.scalar(v), f.arrow_type).as_py())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                if not bad[j] and not label_missing[j]:
                    rejects.add(int(cand[j]), _reason_for(plan, f.name),
                                f"field {f.name!r} = {v!r}; expected " +
                                ("an integer" if f.arrow_type == pa.int64() else "a number"))
                bad[j] = bad[j] or not label_missing[j]
                parsed.append(None)
        cols[f.name] = pa.array(parsed, type=f.arrow_type)
    return Decoded(cand, cols).take(~bad)
