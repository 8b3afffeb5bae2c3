"""ProgressiveMetrics against brute-force references."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.metrics import ProgressiveMetrics, exact_auc


def brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y > 0.5]
    neg = [s for s, y in zip(scores, labels) if y <= 0.5]
    if not pos or not neg:
        return None
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def brute_logloss(logits, labels):
    out = 0.0
    for x, y in zip(logits, labels):
        p = 1.0 / (1.0 + math.exp(-x))
        out += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    return out / len(logits)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=1, max_size=40))
def test_exact_auc_matches_pairs_with_ties(pairs):
    scores = np.array([s for s, _ in pairs], dtype=np.float64)
    labels = np.array([float(y) for _, y in pairs])
    got = exact_auc(scores, labels)
    want = brute_auc(scores.tolist(), labels.tolist())
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, abs=1e-12)


def test_overall_metrics_and_histogram_bound():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 3000).astype(np.float32)
    labels = (rng.random(3000) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    m = ProgressiveMetrics(window_samples=500, auc_bins=64)
    for i in range(0, 3000, 256):
        m.update(logits[i:i + 256], labels[i:i + 256])
    s = m.summary()
    exact = brute_auc(logits.tolist(), labels.tolist())
    assert s["samples"] == 3000
    assert s["auc_error_bound"] > 0  # 64 bins: some bins hold both classes
    assert abs(s["auc"] - exact) <= s["auc_error_bound"] + 1e-12
    assert s["logloss"] == pytest.approx(brute_logloss(logits.tolist(), labels.tolist()), rel=1e-6)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert s["calibration"] == pytest.approx(p.sum() / labels.sum(), rel=1e-9)
    # default bins are fine enough for a tight overall AUC
    fine = ProgressiveMetrics(window_samples=10)
    fine.update(logits, labels)
    auc, bound = fine.histogram_auc()
    assert bound < 1e-3 and abs(auc - exact) <= bound + 1e-12


def test_window_is_exact_over_the_last_samples():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, 1000).astype(np.float32)
    labels = (rng.random(1000) < 0.3).astype(np.float32)
    m = ProgressiveMetrics(window_samples=300)
    start = 0
    for size in (7, 130, 450, 13, 400):  # crosses the ring end, and one chunk > window
        m.update(logits[start:start + size], labels[start:start + size])
        start += size
    wl, wy = m.window()
    np.testing.assert_array_equal(wl, logits[-300:])
    np.testing.assert_array_equal(wy, labels[-300:])
    s = m.summary()
    assert s["window_samples"] == 300
    assert s["window_auc"] == pytest.approx(brute_auc(logits[-300:].tolist(), labels[-300:].tolist()))
    assert s["window_logloss"] == pytest.approx(
        brute_logloss(logits[-300:].tolist(), labels[-300:].tolist()), rel=1e-6)


def test_state_round_trip_continues_identically():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1, 900).astype(np.float32)
    labels = (rng.random(900) < 0.4).astype(np.float32)
    whole = ProgressiveMetrics(window_samples=200, auc_bins=128)
    whole.update(logits[:500], labels[:500])
    whole.update(logits[500:], labels[500:])
    first = ProgressiveMetrics(window_samples=200, auc_bins=128)
    first.update(logits[:500], labels[:500])
    resumed = ProgressiveMetrics(window_samples=200, auc_bins=128)
    resumed.load_state_dict(first.state_dict())
    resumed.update(logits[500:], labels[500:])
    assert resumed.summary() == whole.summary()
    with pytest.raises(ValueError, match="window_samples"):
        ProgressiveMetrics(window_samples=201, auc_bins=128).load_state_dict(first.state_dict())


def test_single_class_and_empty_give_none():
    m = ProgressiveMetrics(window_samples=10)
    s = m.summary()
    assert s["auc"] is None and s["logloss"] is None and s["window_auc"] is None
    m.update(np.array([0.1, -2.0]), np.array([0.0, 0.0]))
    s = m.summary()
    assert s["auc"] is None and s["calibration"] is None and s["window_auc"] is None
    assert s["logloss"] == pytest.approx(brute_logloss([0.1, -2.0], [0.0, 0.0]))


def test_extreme_logits_stay_finite():
    m = ProgressiveMetrics(window_samples=10)
    m.update(np.array([1e4, -1e4, 80.0]), np.array([1.0, 0.0, 0.0]))
    s = m.summary()
    assert math.isfinite(s["logloss"]) and s["logloss"] == pytest.approx(80.0 / 3, rel=1e-6)
