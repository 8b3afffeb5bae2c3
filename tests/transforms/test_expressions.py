"""The derived-field expression grammar: what parses, what it computes, and errors that
name the expression and the fix."""

from __future__ import annotations

import numpy as np
import pytest

from transforms.errors import TransformConfigError
from transforms.expressions import parse_expression


def _eval(text: str, **fields):
    cols = {k: (np.array([np.nan if x is None else x for x in v], dtype=np.float64),
                np.array([x is not None for x in v])) for k, v in fields.items()}
    n = len(next(iter(fields.values()))) if fields else 1
    values, valid = parse_expression(text).evaluate(cols, n)
    return [float(v) if ok else None for v, ok in zip(values, valid)]


@pytest.mark.parametrize("text, want", [
    ("rating >= 4", [1.0, 0.0, None, 1.0]),
    ("rating % 3", [2.0, 0.0, None, 0.0]),
    ("-rating * 2 + 1", [-9.0, -5.0, None, -11.0]),
    ("(rating - 1) / 2", [2.0, 1.0, None, 2.5]),
    ("1 - 2 - 3 + rating * 0", [-4.0, -4.0, None, -4.0]),
    ("2 * 3 % 4", [2.0, 2.0, 2.0, 2.0]),  # left to right: (2 * 3) % 4; no field, never missing
    ("rating == 3 + 0", [0.0, 1.0, None, 0.0]),
    ("rating != 3", [1.0, 0.0, None, 1.0]),
    ("rating / (rating - 3)", [2.5, None, None, 2.0]),  # x / 0 is missing
    ("rating % (rating - 3)", [1.0, None, None, 0.0]),
    ("1e1 > .5", [1.0, 1.0, 1.0, 1.0]),
])
def test_evaluation(text, want):
    assert _eval(text, rating=[5, 3, None, 6]) == want


def test_modulo_is_floored_like_python():
    assert _eval("a % 3", a=[-7, 7]) == [2.0, 1.0]
    assert _eval("a % -3", a=[7]) == [-2.0]


def test_fields_are_listed_once_in_order():
    assert parse_expression("b + a * b - c.d").fields == ("b", "a", "c.d")


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("rating >=", "ends too early"),
    ("(rating", "ends too early"),
    ("rating )", "unexpected ')'"),
    ("a < b < c", "do not chain"),
    ("abs(a)", "no functions"),
    ("a.b()", "no functions"),
    ("a == 'x'", "strings are not allowed"),
    ("__import__('os')", "no functions"),
    ("a ** 2", "unexpected '*'"),
    ("a and b", "unexpected 'and'"),
    ("a; b", "cannot read ';"),
    ("a[0]", "cannot read '[0]'"),
])
def test_errors_name_the_expression_and_the_grammar(text, words):
    with pytest.raises(TransformConfigError) as err:
        parse_expression(text)
    assert words in str(err.value) and repr(text) in str(err.value)
    assert "e.g. \"rating >= 4\"" in str(err.value)
