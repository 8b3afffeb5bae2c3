"""Smoke test of bench/quality.py: it runs on a short stream and prints its JSON contract last."""

from __future__ import annotations

import pytest

from tests.bench.test_hash_bench import run_json

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def test_quality_bench_prints_each_kind_next_to_the_baseline():
    # with the batch accumulator and no batch ramp the linear kind is the per-batch baseline's learner
    out = run_json("bench/quality.py", "--events", "2000", "--datasets", "shop_events", "--kinds", "linear",
                   "--model-seeds", "1", "--set", "model.first_order_accumulator=batch",
                   "--set", "model.first_order_learning_rate=0.1", "--set", "trainer.batch_ramp_samples=0", "--json")
    shop = out["datasets"]["shop_events"]
    assert shop["events"] == 2000 and set(shop["models"]) == {"linear"}
    for key in ("lr_auc", "lr_logloss", "lr_per_example_auc", "lr_per_example_logloss"):
        assert 0 < shop[key] < 1
    assert set(shop["lr_rates"]) == {"0.03", "0.1", "0.3"}
    for m in shop["models"].values():
        assert 0.5 < m["auc"] < 1 and 0 < m["logloss"] < 1
    # at the baseline's rate 0.1 their AUCs agree
    assert shop["models"]["linear"]["auc"] == pytest.approx(shop["lr_rates"]["0.1"]["auc"], abs=1e-6)
    assert out["default_kind"] == "dlrm" and set(out["targets"]) == {"auc_ge_lr", "default_within_0_002_of_best"}
    assert out["targets"]["auc_ge_lr"]["shop_events"].keys() == {"linear"}
