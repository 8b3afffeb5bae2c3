"""Filter grammar, errors and vectorised evaluation against a Python reference."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import FilterConfig
from transforms.errors import TransformConfigError
from transforms.filters import FilterOp, compile_filter, parse_clause


@pytest.mark.parametrize("text,field,op,values", [
    ("label present", "label", FilterOp.PRESENT, ()),
    ("  x.y-z missing ", "x.y-z", FilterOp.MISSING, ()),
    ("country == 'US'", "country", FilterOp.EQ, ("US",)),
    ('name != "it\\"s"', "name", FilterOp.NE, ('it"s',)),
    ("price > 0", "price", FilterOp.GT, (0,)),
    ("price>=-1.5e2", "price", FilterOp.GE, (-150.0,)),
    ("n < 3", "n", FilterOp.LT, (3,)),
    ("n <= .5", "n", FilterOp.LE, (0.5,)),
    ("kind in ['click', 'view']", "kind", FilterOp.IN, ("click", "view")),
    ("id not in [1, 2,3]", "id", FilterOp.NOT_IN, (1, 2, 3)),
])
def test_grammar(text, field, op, values):
    c = parse_clause(text)
    assert (c.field, c.op, c.values) == (field, op, values)


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("price >", "expected"),
    ("price > 0 1", "expected"),
    ("'x' == 1", "field name"),
    ("price => 3", "expected"),
    ("kind in 'a'", "needs a list"),
    ("kind in ['a', 1]", "mixes numbers and strings"),
    ("kind in ['a' 'b']", "expected ','"),
    ("kind in ['a',]", "ends with ','"),
    ("price > abc", "not a value"),
    ("price ~ 3", "cannot read"),
    ("__import__('os') present", "expected"),
])
def test_bad_clauses_name_the_clause(text, needle):
    with pytest.raises(TransformConfigError) as ei:
        parse_clause(text)
    assert needle in str(ei.value) and repr(text) in str(ei.value)


def test_mixed_literal_types_for_one_field():
    with pytest.raises(TransformConfigError, match="both numbers and strings"):
        compile_filter(FilterConfig(where=("x > 1", "x != 'a'")))


VALS = st.one_of(st.none(), st.integers(-3, 3))


@settings(max_examples=60, deadline=None)
@given(st.lists(VALS, min_size=1, max_size=30), st.lists(st.one_of(st.none(), st.sampled_from("abc")), min_size=30, max_size=30))
def test_evaluation_matches_reference(nums, strs):
    strs = strs[: len(nums)]
    plan = compile_filter(FilterConfig(where=("n >= -1", "n != 2", "s not in ['c']", "s present")))
    cols = {"n": pa.array([None if v is None else float(v) for v in nums], pa.float64()),
            "s": pa.array(strs, pa.string())}
    got = plan.keep_mask(cols, len(nums)).tolist()
    want = [n is not None and n >= -1 and n != 2 and s is not None and s != "c" for n, s in zip(nums, strs)]
    assert got == want


def test_int_columns_compare_exactly_beyond_2_53():
    big = (1 << 62) + 1
    plan = compile_filter(FilterConfig(where=(f"id == {big}",)))
    col = pa.array([big, big - 1, None], pa.int64())
    assert plan.keep_mask({"id": col}, 3).tolist() == [True, False, False]
    plan = compile_filter(FilterConfig(where=("id in [1, 2]", "id < 1.5")))
    assert plan.keep_mask({"id": pa.array([1, 2, 3], pa.int64())}, 3).tolist() == [True, False, False]


def test_missing_semantics():
    plan = compile_filter(FilterConfig(where=("x missing",)))
    assert plan.keep_mask({"x": pa.array([None, "a"])}, 2).tolist() == [True, False]
    plan = compile_filter(FilterConfig(where=("x not in ['a']",)))
    assert plan.keep_mask({"x": pa.array([None, "a", "b"])}, 3).tolist() == [False, False, True]


def test_negative_sampling_is_deterministic_and_near_rate():
    plan = compile_filter(FilterConfig(negative_keep_rate=0.3))
    raw = pa.array([f'{{"label": 0, "n": {i}}}'.encode() for i in range(4000)], pa.binary())
    labels = np.zeros(4000)
    keep = plan.negatives_kept(labels, raw)
    assert abs(keep.mean() - 0.3) < 0.04
    assert np.array_equal(keep, plan.negatives_kept(labels, raw))
    # positives always kept; the decision for one event does not depend on its batch
    assert plan.negatives_kept(np.ones(4000), raw).all()
    assert np.array_equal(plan.negatives_kept(labels[100:200], raw.slice(100, 100)), keep[100:200])
    assert plan.active and not compile_filter(FilterConfig()).active
