"""Derived-field expressions (``[schema] derive``): parsed once, evaluated vectorised.

Grammar (no calls, no attribute access, no strings, nothing ``eval``-like)::

    expr     := sum (CMP sum)?          CMP := == != < <= > >=   (not chained)
    sum      := product (("+" | "-") product)*
    product  := unary (("*" | "/" | "%") unary)*
    unary    := "-" unary | atom
    atom     := NUMBER | FIELD | "(" expr ")"
    FIELD    := [A-Za-z_][A-Za-z0-9_.]*   (a raw event field or an earlier derived field)
    NUMBER   := 123 | 1.5 | .5 | 2e3

Semantics, over float64: a comparison yields 1.0 (true) or 0.0 (false); ``%`` is Python's
(floored: ``-7 % 3 == 2``); ``x / 0`` and ``x % 0`` are missing. A missing (null) operand
makes the result missing (SQL-like), so ``rating >= 4`` of an event without ``rating`` is
missing, not 0. Integer fields (int sparse features, the event time) are read as float64,
exact below 2**53.

Example:
    >>> import numpy as np
    >>> e = parse_expression("rating >= 4")
    >>> e.fields
    ('rating',)
    >>> values, valid = e.evaluate({"rating": (np.array([5.0, 3.0, 0.0]), np.array([True, True, False]))}, 3)
    >>> values[valid].tolist(), valid.tolist()
    ([1.0, 0.0], [True, True, False])
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np

from transforms.errors import TransformConfigError

__all__ = ["Expression", "parse_expression", "scan_tokens"]

#: (float64 values, bool validity) of one column; values under an invalid flag are ignored.
Column = tuple[np.ndarray, np.ndarray]

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![A-Za-z0-9_.])
    | (?P<op>==|!=|<=|>=|<|>|[-+*/%()])
    | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    )""", re.VERBOSE)
_COMPARE = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
            ">=": np.greater_equal}
_GRAMMAR = ("an expression uses numbers, field names, parentheses, + - * / % and one comparison "
            "(== != < <= > >=), e.g. \"rating >= 4\" or \"(hour % 100) * 60\"; no functions, strings "
            "or attribute access")


@dataclasses.dataclass(frozen=True)
class _Num:
    value: float


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str


@dataclasses.dataclass(frozen=True)
class _Neg:
    operand: "_Node"


@dataclasses.dataclass(frozen=True)
class _Binary:
    op: str
    left: "_Node"
    right: "_Node"


_Node = _Num | _Field | _Neg | _Binary


@dataclasses.dataclass(frozen=True)
class Expression:
    """One parsed expression; picklable and pure."""

    text: str
    root: _Node

    @property
    def fields(self) -> tuple[str, ...]:
        """Field names it reads, in order of first appearance."""
        out: dict[str, None] = {}

        def walk(n):
            if isinstance(n, _Field):
                out[n.name] = None
            elif isinstance(n, _Neg):
                walk(n.operand)
            elif isinstance(n, _Binary):
                walk(n.left)
                walk(n.right)

        walk(self.root)
        return tuple(out)

    def evaluate(self, columns: Mapping[str, Column], num_rows: int) -> Column:
        """(float64 values, validity) of ``num_rows`` rows; ``columns`` holds every field of
        ``fields``."""
        with np.errstate(all="ignore"):
            values, valid = _eval(self.root, columns, num_rows)
        return np.asarray(values, dtype=np.float64), valid


def _eval(node: _Node, columns: Mapping[str, Column], n: int) -> Column:
    if isinstance(node, _Num):
        return np.full(n, node.value), np.ones(n, dtype=bool)
    if isinstance(node, _Field):
        return columns[node.name]
    if isinstance(node, _Neg):
        v, ok = _eval(node.operand, columns, n)
        return -v, ok
    a, a_ok = _eval(node.left, columns, n)
    b, b_ok = _eval(node.right, columns, n)
    ok = a_ok & b_ok
    op = node.op
    if op in _COMPARE:
        return _COMPARE[op](a, b).astype(np.float64), ok
    if op == "+":
        return a + b, ok
    if op == "-":
        return a - b, ok
    if op == "*":
        return a * b, ok
    ok = ok & (b != 0)
    return (a / b if op == "/" else np.mod(a, b)), ok


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokens(text)
        self.pos = 0

    def fail(self, what: str) -> TransformConfigError:
        return TransformConfigError(f"expression {self.text!r}: {what}; {_GRAMMAR}")

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise self.fail("ends too early")
        self.pos += 1
        return tok

    def expr(self) -> _Node:
        left = self.sum()
        tok = self.peek()
        if tok and tok[1] in _COMPARE:
            self.pos += 1
            left = _Binary(tok[1], left, self.sum())
            nxt = self.peek()
            if nxt and nxt[1] in _COMPARE:
                raise self.fail(f"comparisons do not chain ({tok[1]!r} then {nxt[1]!r}); use one")
        return left

    def _chain(self, ops: str, operand) -> _Node:
        left = operand()
        while (tok := self.peek()) is not None and tok[0] == "op" and tok[1] in ops:
            self.pos += 1
            left = _Binary(tok[1], left, operand())
        return left

    def sum(self) -> _Node:
        return self._chain("+-", self.product)

    def product(self) -> _Node:
        return self._chain("*/%", self.unary)

    def unary(self) -> _Node:
        tok = self.peek()
        if tok == ("op", "-"):
            self.pos += 1
            return _Neg(self.unary())
        return self.atom()

    def atom(self) -> _Node:
        kind, tok = self.take()
        if kind == "num":
            return _Num(float(tok))
        if kind == "name":
            nxt = self.peek()
            if nxt == ("op", "("):
                raise self.fail(f"{tok}(...) looks like a function call; there are no functions")
            return _Field(tok)
        if tok == "(":
            inner = self.expr()
            if self.take() != ("op", ")"):
                raise self.fail("a '(' is not closed")
            return inner
        raise self.fail(f"unexpected {tok!r}")


def scan_tokens(text: str, token_re: re.Pattern, unreadable) -> list[tuple[str, str]]:
    """``(kind, token)`` pairs of ``text`` by the named groups of ``token_re`` (whitespace
    skipped by the pattern itself); ``unreadable(rest)`` builds the error raised at the first
    text no group matches. Shared by this grammar and the filter clauses."""
    out, pos = [], 0
    stripped = text.rstrip()
    while pos < len(stripped):
        m = token_re.match(stripped, pos)
        if not m or m.end() == pos:
            raise unreadable(stripped[pos:].strip())
        out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return out


def _unreadable(text: str):
    def error(bad: str) -> TransformConfigError:
        hint = " (strings are not allowed)" if bad[:1] in "'\"" else ""
        return TransformConfigError(f"expression {text!r}: cannot read {bad!r}{hint}; {_GRAMMAR}")
    return error


def _tokens(text: str) -> list[tuple[str, str]]:
    return scan_tokens(text, _TOKEN, _unreadable(text))


def parse_expression(text: str) -> Expression:
    """Parse ``text``; TransformConfigError naming the expression and the grammar if it is
    not one."""
    if not isinstance(text, str) or not text.strip():
        raise TransformConfigError(f"expression {text!r} is empty; {_GRAMMAR}")
    p = _Parser(text)
    root = p.expr()
    if p.peek() is not None:
        raise p.fail(f"unexpected {p.peek()[1]!r} after a complete expression")
    return Expression(text, root)
