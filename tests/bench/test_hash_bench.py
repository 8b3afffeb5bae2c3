"""Smoke tests of the hashing benchmarks: they run and print their JSON contract last."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_remap_bench_prints_its_contract():
    out = run_json("bench/remap.py", "--entries", "20000", "--queries", "200000", "--repeats", "1", "--json")
    assert out["table_entries"] == 20000 and 0 < out["table_bytes"] <= 20000 * 26
    for key in ("learned_ids_per_s", "kernel_ids_per_s", "modulo_ids_per_s", "numpy_ids_per_s",
                "uniform_learned_ids_per_s", "uniform_kernel_ids_per_s"):
        assert out[key] > 0


def test_hash_quality_quick_prints_rows_per_mapper():
    out = run_json("bench/hash_quality.py", "--quick", "--compressions", "16", "--json")
    got = {(r["mapper"], r["compression"]) for r in out["rows"]}
    assert got == {("uncompressed", 1), ("modulo", 16), ("double", 16), ("frequency", 16), ("learned", 16)}
    for r in out["rows"]:
        assert set(r) >= {"mapper", "compression", "logloss", "auc", "fit_s", "rows", "table_bytes",
                          "mapper_bytes", "total_bytes"}
        assert 0 < r["logloss"] < 1.0 and 0.5 < r["auc"] <= 1.0
        assert r["total_bytes"] == r["table_bytes"] + r["mapper_bytes"]
    at16 = {r["mapper"]: r for r in out["rows"] if r["compression"] == 16}
    # equal total memory: the hashing tricks spend the budget on rows, the table mappers
    # give rows up for their id tables and codes and stay within the same budget
    budget = at16["modulo"]["total_bytes"]
    assert at16["modulo"]["mapper_bytes"] == 0 and at16["double"]["total_bytes"] == budget
    for name in ("frequency", "learned"):
        assert 0 < at16[name]["mapper_bytes"] and budget - 128 * 3 < at16[name]["total_bytes"] <= budget
        assert at16[name]["rows"] < at16["modulo"]["rows"]
    assert out["memory"] == "total" and set(out["ordering"]) == {"16"}
