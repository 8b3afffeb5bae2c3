"""CSV decode (RFC 4180): one record per Kafka message or per file record.

Columns are named by the header record of the file the batch comes from
(``streams.records.CSV_HEADER_KEY``; a leading UTF-8 byte-order mark is dropped) or, for
records without one (Kafka messages, files read with ``csv_header = false``), by
``schema.columns``. A field is the first column of its name; a field the header does not
name is missing in every record of that file (like an absent JSON key).

A record is fields separated by ``,``. A field enclosed in ``"`` may hold commas, line
breaks and ``""`` (one quote). A trailing ``\\n`` or ``\\r\\n`` is dropped. The record is
``bad_csv_row`` when a quote is left open, a quote appears inside an unquoted field or
text follows a closing quote, a line break is outside quotes, or its field count differs
from the number of columns; ``not_utf8`` (checked first) when its bytes are not UTF-8. An
empty field (``,,`` or ``""``) is missing. Values convert as in TSV (``decode_tsv``): a
number or integer that does not parse is ``bad_label`` / ``bad_event_time`` /
``wrong_type``.

Like TSV, the records are checked by one Numba scan, then parsed by one vectorised
``pyarrow.csv`` call over the joined records; a malformed record never reaches the bulk
parse, so it cannot shift its neighbours.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from transforms.decode import (
    FLAG_NEWLINE,
    FLAG_NON_ASCII,
    Decoded,
    DecodePlan,
    Rejects,
    join_rows,
    raw_buffers,
)
from transforms.decode_tsv import read_text_columns, trim_line_end, typed_columns
from transforms.elements import Reason
from transforms.errors import TransformConfigError

__all__ = ["decode_csv", "scan_csv_rows", "header_columns"]

FLAG_BAD_QUOTE = 4  # a quote inside an unquoted field, or text after a closing quote
FLAG_OPEN_QUOTE = 8  # the record ends inside a quoted field
FLAG_QUOTED_NEWLINE = 16  # a line break inside a quoted field (allowed)

_BOM = b"\xef\xbb\xbf"
_OPTIONS = dict(delimiter=",", quote_char='"', double_quote=True, escape_char=False, ignore_empty_lines=False)


@numba.njit(cache=True, nogil=True)
def scan_csv_rows(data, starts, ends):
    """Per row: number of fields and FLAG_* bits (``FLAG_NEWLINE``: a line break outside
    quotes; ``FLAG_NON_ASCII``; and this module's quote flags)."""
    n = starts.shape[0]
    fields = np.ones(n, dtype=np.int64)
    flags = np.zeros(n, dtype=np.uint8)
    for i in range(n):
        nf = 1
        f = 0
        state = 0  # 0 field start, 1 unquoted field, 2 inside quotes, 3 quote inside quotes
        for k in range(starts[i], ends[i]):
            b = data[k]
            if b >= 128:
                f |= 2
            if state == 2:
                if b == 34:
                    state = 3
                elif b == 10 or b == 13:
                    f |= 16
            elif state == 3:
                if b == 34:
                    state = 2
                elif b == 44:
                    nf += 1
                    state = 0
                else:
                    f |= 4
                    state = 1
                    if b == 10 or b == 13:
                        f |= 1
            elif b == 44:
                nf += 1
                state = 0
            elif b == 34:
                if state == 0:
                    state = 2
                else:
                    f |= 4
            else:
                if b == 10 or b == 13:
                    f |= 1
                state = 1
        if state == 2:
            f |= 8
        fields[i] = nf
        flags[i] = f
    return fields, flags


def _row_problem(fields: int, flags: int, want: int) -> str | None:
    if flags & FLAG_OPEN_QUOTE:
        return 'a quoted field is not closed (unbalanced ")'
    if flags & FLAG_BAD_QUOTE:
        return 'a quote inside an unquoted field, or text after a closing quote; quote the whole field and write a quote as ""'
    if flags & FLAG_NEWLINE:
        return "a line break outside quotes"
    if fields != want:
        return f"{fields} comma-separated fields; the columns name {want}"
    return None


@functools.lru_cache(maxsize=256)
def header_columns(header: bytes) -> tuple[str, ...] | str:
    """The column names of a CSV header record, or a string saying why it is not one."""
    header = header.removeprefix(_BOM)
    data = np.frombuffer(header, dtype=np.uint8) if header else np.zeros(1, np.uint8)
    starts, ends = np.zeros(1, np.int64), np.full(1, len(header), np.int64)
    fields, flags = scan_csv_rows(data, starts, ends)
    problem = _row_problem(int(fields[0]), int(flags[0]), int(fields[0]))
    if problem is not None:
        return f"the file's header record is not valid CSV: {problem}"
    try:
        header.decode("utf-8")
    except UnicodeDecodeError as u:
        return f"the file's header record is not UTF-8 (byte {u.start}: {u.reason})"
    names = [f"c{i}" for i in range(int(fields[0]))]
    text = read_text_columns(np.frombuffer(header + b"\n", dtype=np.uint8), names, names, 1,
                             pcsv.ParseOptions(newlines_in_values=bool(flags[0] & FLAG_QUOTED_NEWLINE), **_OPTIONS))
    return tuple(text[c][0].as_py() or "" for c in names)


def decode_csv(plan: DecodePlan, values: pa.Array, candidates: np.ndarray, rejects: Rejects,
               header: bytes | None = None) -> Decoded:
    """Parse records ``values[candidates]`` (non-empty, size-checked) as CSV records whose
    columns ``header`` (a file's header record) or else ``plan.columns`` name.
    TransformConfigError when neither names them."""
    if header is not None:
        names = header_columns(header)
    elif plan.columns:
        names = plan.columns
    else:
        raise TransformConfigError(
            "format = 'csv' with empty [schema] columns reads column names from each file's header row, but "
            "these records have none (Kafka messages never do); set [schema] columns = [...] naming the "
            "columns in order")
    offsets, data = raw_buffers(values)
    starts = offsets[candidates]
    ends = trim_line_end(data, starts, offsets[candidates + 1])
    if isinstance(names, str):  # the file's header is unusable: so is each of its records
        for j in range(len(candidates)):
            rejects.add(int(candidates[j]), Reason.BAD_CSV_ROW, names)
        return _empty(plan)
    fields, flags = scan_csv_rows(data, starts, ends)
    want = len(names)
    ok = np.ones(len(candidates), dtype=bool)
    for j in np.flatnonzero((fields != want) | ((flags & ~np.uint8(FLAG_QUOTED_NEWLINE)) != 0)):
        if flags[j] & FLAG_NON_ASCII:
            try:
                bytes(data[starts[j]:ends[j]]).decode("utf-8")
            except UnicodeDecodeError as u:
                rejects.add(int(candidates[j]), Reason.NOT_UTF8, f"byte {u.start}: {u.reason}")
                ok[j] = False
                continue
        problem = _row_problem(int(fields[j]), int(flags[j]), want)
        if problem is not None:
            rejects.add(int(candidates[j]), Reason.BAD_CSV_ROW, problem)
            ok[j] = False
    cand = candidates[ok]
    if len(cand) == 0:
        return _empty(plan)
    position = {}
    for i, name in enumerate(names):
        position.setdefault(name, i)
    wanted = {f.name: f"c{position[f.name]}" for f in plan.fields if f.name in position}
    quoted_newlines = bool((flags[ok] & FLAG_QUOTED_NEWLINE).any())
    buf = join_rows(data, starts[ok], ends[ok], False)
    text = read_text_columns(buf, [f"c{i}" for i in range(want)], list(wanted.values()), len(cand),
                             pcsv.ParseOptions(newlines_in_values=quoted_newlines, **_OPTIONS))
    columns = {f.name: text[wanted[f.name]] if f.name in wanted else pa.nulls(len(cand), pa.string())
               for f in plan.fields}
    return typed_columns(plan, columns, cand, rejects)


def _empty(plan: DecodePlan) -> Decoded:
    return Decoded(np.empty(0, dtype=np.int64), {f.name: pa.array([], type=f.arrow_type) for f in plan.fields})
