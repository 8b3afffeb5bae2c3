"""The trainer's live numbers: fixed-bucket histograms, freshness quantiles over a window,
and the event times a training batch carries for them."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from trainer.data import BatchLayout, rebatch
from trainer.live_metrics import BucketHistogram, FreshnessMetrics, LiveMetrics


def test_histogram_counts_match_numpy_with_inclusive_upper_bounds():
    rng = np.random.default_rng(3)
    bounds = (0.1, 0.5, 1.0, 5.0)
    values = np.concatenate([rng.exponential(1.0, 5000), np.array(bounds)])  # values on a bound: "le"
    h = BucketHistogram(bounds)
    h.observe_many(values[:2000])
    for v in values[2000:2010]:
        h.observe(v)
    h.observe_many(values[2010:])
    edges = np.concatenate([[-np.inf], bounds, [np.inf]])
    expected = [int(((values > lo) & (values <= hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    assert h.counts.tolist() == expected and h.count == values.size
    assert h.sum == pytest.approx(values.sum())
    again = BucketHistogram.from_dict(h.to_dict())
    assert again.counts.tolist() == expected and again.sum == h.sum


def test_histogram_rejects_bad_bounds():
    for bounds in ((), (1.0, 1.0), (2.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError):
            BucketHistogram(bounds)


def test_freshness_window_quantiles_are_exact_over_the_last_rows():
    rng = np.random.default_rng(5)
    f = FreshnessMetrics(window_rows=1000)
    assert f.summary() == {"freshness_p50_s": None, "freshness_p99_s": None}
    seen = []
    now_s = 2_000_000.0
    for n in (10, 700, 1, 999, 1500, 3):  # wraps the ring buffer, and once overfills it
        fresh = rng.uniform(0, 100, n)
        f.observe(((now_s - fresh) * 1000).astype(np.int64), now_s)
        seen.extend(((now_s * 1000 - ((now_s - fresh) * 1000).astype(np.int64)) / 1000).tolist())
    last = np.array(seen[-1000:])
    p50, p99 = f.quantiles((0.5, 0.99))
    assert p50 == pytest.approx(np.quantile(last, 0.5)) and p99 == pytest.approx(np.quantile(last, 0.99))
    assert f.histogram.count == len(seen)


def test_live_metrics_off_keeps_nothing():
    live = LiveMetrics(None)
    live.observe_step(0.01, np.array([1, 2]), 3.0)
    assert live.summary() == {}
    on = LiveMetrics(10)
    on.observe_step(0.01, np.array([1000, 2000]), 3.0)
    s = on.summary()
    assert s["freshness_p50_s"] == pytest.approx(1.5)
    assert sum(s["histograms"]["step_seconds"]["counts"]) == 1
    assert sum(s["histograms"]["freshness_seconds"]["counts"]) == 2


@dataclasses.dataclass(frozen=True)
class Cached:
    seq: int
    batch: pa.RecordBatch
    mapping_version: int = 0


LAYOUT = BatchLayout(label="label", dense=("x",), sparse=("u",), sparse_rows=(10,))


def _cached(seq, start, n, with_times=True):
    r = np.arange(start, start + n)
    cols = {"label": pa.array((r % 2).astype(np.float32)), "x": pa.array(r.astype(np.float32)),
            "u": pa.array(r % 10), "_offset": pa.array(r)}
    if with_times:
        cols["_event_time_ms"] = pa.array(1_000_000 + r * 10)
    return Cached(seq, pa.record_batch(cols))


def test_training_batches_carry_each_rows_event_time_across_pieces():
    items = list(rebatch([_cached(0, 0, 5), _cached(1, 5, 7), _cached(2, 12, 4)], LAYOUT, 6))
    rows = np.concatenate([it.batch.dense[:, 0].numpy().astype(np.int64) for it in items])
    times = np.concatenate([it.event_time_ms for it in items])
    np.testing.assert_array_equal(times, 1_000_000 + rows * 10)
    assert [len(it.event_time_ms) for it in items] == [6, 6, 4]


def test_a_batch_without_event_times_has_none():
    items = list(rebatch([_cached(0, 0, 3), _cached(1, 3, 3, with_times=False)], LAYOUT, 6))
    assert len(items) == 1 and items[0].event_time_ms is None
