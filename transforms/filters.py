"""Row filters: the ``[filter]`` config parsed once into clauses, evaluated vectorised.

Grammar of one ``where`` clause (all clauses are ANDed; no ``eval``)::

    clause  := FIELD "present" | FIELD "missing"
             | FIELD op LITERAL                      op := == != < <= > >=
             | FIELD "in" "[" LITERAL ("," LITERAL)* "]"
             | FIELD "not" "in" "[" ... "]"
    FIELD   := [A-Za-z_][A-Za-z0-9_.-]*
    LITERAL := number (123, -1.5, 2e3) | 'quoted' or "quoted" string (\\ escapes)

Semantics (SQL-like): a comparison or ``in``/``not in`` on a missing (or null) field is
false, so the event is filtered; ``present``/``missing`` test for a non-null value. Fields
may be features, derived fields (``[schema] derive``: numbers) or any other field of the
raw event: those are decoded too and dropped by projection. A non-feature field's type comes from its literals: numbers -> float64,
strings -> string; a field used only with ``present``/``missing`` is read as a string. A
value of another JSON type in such a field is a dead letter ``wrong_type``.

``negative_keep_rate``: a negative (label == 0) is kept iff ``unit(hash(raw bytes)) <
rate``, where ``hash`` is ``hashing.hash_strings`` of the raw message bytes and ``unit``
its top 53 bits as a fraction: deterministic, so a stream and a backfill of one log keep
the same events.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.config import FilterConfig
from transforms.errors import TransformConfigError
from transforms.expressions import scan_tokens
from transforms.hashing import hash_strings, unit_interval

__all__ = ["FilterOp", "LiteralKind", "Clause", "FilterPlan", "parse_clause", "compile_filter"]


class FilterOp(enum.Enum):
    PRESENT = "present"
    MISSING = "missing"
    EQ = "=="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    IN = "in"
    NOT_IN = "not in"


class LiteralKind(enum.Enum):
    NUMBER = "number"
    STRING = "string"


_COMPARE = {FilterOp.EQ: pc.equal, FilterOp.NE: pc.not_equal, FilterOp.LT: pc.less,
            FilterOp.LE: pc.less_equal, FilterOp.GT: pc.greater, FilterOp.GE: pc.greater_equal}

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![A-Za-z0-9_.])
    | (?P<op>==|!=|<=|>=|<|>)
    | (?P<punct>[\[\],])
    | (?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)
    )""", re.VERBOSE)
_INT = re.compile(r"^[-+]?\d+$")
_GRAMMAR = ("expected `FIELD present`, `FIELD missing`, `FIELD <op> VALUE` (op one of == != < "
            "<= > >=), `FIELD in [V, ...]` or `FIELD not in [V, ...]`, with VALUE a number or "
            "a 'quoted string'")


@dataclasses.dataclass(frozen=True)
class Clause:
    field: str
    op: FilterOp
    values: tuple[int | float | str, ...]  # empty for present/missing
    text: str

    @property
    def kind(self) -> LiteralKind | None:
        if not self.values:
            return None
        return LiteralKind.STRING if isinstance(self.values[0], str) else LiteralKind.NUMBER


def _tokens(text: str) -> list[tuple[str, str]]:
    return scan_tokens(text, _TOKEN, lambda bad: TransformConfigError(
        f"filter clause {text!r}: cannot read {bad!r}; {_GRAMMAR}"))


def _literal(kind: str, tok: str, text: str) -> int | float | str:
    if kind == "str":
        body = tok[1:-1]
        return re.sub(r"\\(.)", r"\1", body)
    if kind == "num":
        return int(tok) if _INT.match(tok) else float(tok)
    raise TransformConfigError(f"filter clause {text!r}: {tok!r} is not a value; {_GRAMMAR}")


def parse_clause(text: str) -> Clause:
    """Parse one ``where`` clause; TransformConfigError naming the clause if it is not in the grammar."""
    if not isinstance(text, str) or not text.strip():
        raise TransformConfigError(f"filter clause {text!r} is empty; {_GRAMMAR}")
    toks = _tokens(text)
    if toks[0][0] != "word":
        raise TransformConfigError(f"filter clause {text!r}: must start with a field name; {_GRAMMAR}")
    field, rest = toks[0][1], toks[1:]
    words = [t for _, t in rest]
    if words in (["present"], ["missing"]):
        return Clause(field, FilterOp(words[0]), (), text)
    if len(rest) == 2 and rest[0][0] == "op":
        return Clause(field, FilterOp(rest[0][1]), (_literal(*rest[1], text),), text)
    if words[:1] == ["in"] or words[:2] == ["not", "in"]:
        op = FilterOp.IN if words[0] == "in" else FilterOp.NOT_IN
        lst = rest[1:] if op is FilterOp.IN else rest[2:]
        if len(lst) < 3 or lst[0][1] != "[" or lst[-1][1] != "]":
            raise TransformConfigError(f"filter clause {text!r}: `{op.value}` needs a list like [1, 2] or ['a', 'b']")
        items = lst[1:-1]
        values = []
        for i, tok in enumerate(items):
            if i % 2 == 1:
                if tok[1] != ",":
                    raise TransformConfigError(f"filter clause {text!r}: expected ',' between list values, got {tok[1]!r}")
                continue
            values.append(_literal(*tok, text))
        if len(items) % 2 == 0:
            raise TransformConfigError(f"filter clause {text!r}: list ends with ','")
        kinds = {isinstance(v, str) for v in values}
        if len(kinds) > 1:
            raise TransformConfigError(f"filter clause {text!r}: list mixes numbers and strings; use one type")
        return Clause(field, op, tuple(values), text)
    raise TransformConfigError(f"filter clause {text!r}: {_GRAMMAR}")


@dataclasses.dataclass(frozen=True)
class FilterPlan:
    """Parsed ``[filter]`` section. Picklable; evaluation is pure."""

    clauses: tuple[Clause, ...]
    negative_keep_rate: float = 1.0

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.field for c in self.clauses))

    def literal_kind(self, field: str) -> LiteralKind | None:
        """The literal type compared against ``field`` (None: presence tests only).
        TransformConfigError when one field is compared with both numbers and strings."""
        kinds = {c.kind for c in self.clauses if c.field == field and c.kind is not None}
        if len(kinds) > 1:
            texts = [c.text for c in self.clauses if c.field == field]
            raise TransformConfigError(f"filter clauses {texts} compare field {field!r} with both numbers and strings")
        return kinds.pop() if kinds else None

    @property
    def active(self) -> bool:
        return bool(self.clauses) or self.negative_keep_rate < 1.0

    def keep_mask(self, columns: Mapping[str, pa.Array], num_rows: int) -> np.ndarray:
        """Bool mask of rows passing every clause. ``columns`` holds each filter field as
        decoded (nulls where missing)."""
        keep = np.ones(num_rows, dtype=bool)
        for c in self.clauses:
            keep &= _evaluate(c, columns[c.field])
        return keep

    def negatives_kept(self, labels: np.ndarray, raw: pa.Array) -> np.ndarray:
        """Bool mask: True for positives and for the sampled-in negatives."""
        if self.negative_keep_rate >= 1.0:
            return np.ones(len(labels), dtype=bool)
        keep = unit_interval(hash_strings(raw)) < self.negative_keep_rate
        return keep | (labels != 0)


def _numeric_operands(col: pa.Array, values: tuple) -> tuple[pa.Array, list]:
    # int64 ids beyond 2**53 must compare exactly, so stay in int64 when every literal is one
    if pa.types.is_integer(col.type) and all(isinstance(v, int) for v in values):
        return col, [pa.scalar(v, pa.int64()) for v in values]
    return pc.cast(col, pa.float64()), [pa.scalar(float(v), pa.float64()) for v in values]


def _evaluate(c: Clause, col: pa.Array) -> np.ndarray:
    if c.op is FilterOp.PRESENT:
        return col.is_valid().to_numpy(zero_copy_only=False)
    if c.op is FilterOp.MISSING:
        return col.is_null().to_numpy(zero_copy_only=False)
    if c.kind is LiteralKind.NUMBER:
        col, scalars = _numeric_operands(col, c.values)
    else:
        scalars = [pa.scalar(v, pa.string()) for v in c.values]
    if c.op in (FilterOp.IN, FilterOp.NOT_IN):
        hit = pc.is_in(col, value_set=pa.array([s.as_py() for s in scalars], type=scalars[0].type))
        if c.op is FilterOp.NOT_IN:
            hit = pc.and_(pc.invert(hit), col.is_valid())
        else:
            hit = pc.and_(hit, col.is_valid())
    else:
        hit = _COMPARE[c.op](col, scalars[0])
    return pc.fill_null(hit, False).to_numpy(zero_copy_only=False)


def compile_filter(cfg: FilterConfig) -> FilterPlan:
    """Parse every clause of ``cfg.where`` once (TransformConfigError names a bad clause)."""
    plan = FilterPlan(tuple(parse_clause(w) for w in cfg.where), cfg.negative_keep_rate)
    for f in plan.fields:
        plan.literal_kind(f)
    return plan
