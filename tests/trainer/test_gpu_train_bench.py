"""Smoke test of bench/gpu_train.py on a tiny shape: baseline, trainer from a real LMDB cache
and row-cached trainer all run, and the JSON contract is its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_train_bench_prints_its_contract(tmp_path):
    args = ["bench/gpu_train.py", "--tables", "4", "--rows-cap", "800", "--batch-size", "64",
            "--steps", "4", "--blocks", "2", "--warmup", "2", "--train-batches", "6", "--segments", "2",
            "--row-cache-batches", "3", "--row-cache-segments", "1", "--cache-batch-rows", "100",
            "--threads", "1", "--dir", str(tmp_path), "--json"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("baseline_samples_per_s", "samples_per_s", "row_cache_samples_per_s", "step_samples_per_s"):
        assert out[key] > 0, key
    assert out["ratio"] == out["samples_per_s"] / out["baseline_samples_per_s"]
    assert out["row_cache_ratio"] == out["row_cache_samples_per_s"] / out["samples_per_s"]
    assert 0 <= out["data_wait_fraction"] < 1
    assert out["device"] == "cpu" and out["tables"] == 4 and out["rows_cap"] == 800
    # 2 segments x 3 timed batches after 2 warm-up batches each; the row cache's 3 in one
    assert out["trainer"]["timed_batches"] == 6 and out["trainer"]["segments"] == 2
    assert out["row_cache"]["timed_batches"] == 3 and 0 < out["row_cache"]["hit_rate"] <= 1
    assert out["row_cache_rows_per_table"] == 100  # 800 rows / --cache-ratio 8
    assert os.listdir(tmp_path) == []  # the temporary cache, checkpoints and row store are gone
