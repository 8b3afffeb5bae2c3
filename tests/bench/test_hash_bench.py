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
    assert out["table_entries"] == 20000
    for key in ("learned_ids_per_s", "modulo_ids_per_s", "numpy_ids_per_s"):
        assert out[key] > 0


def test_hash_quality_quick_prints_rows_per_mapper():
    out = run_json("bench/hash_quality.py", "--quick", "--compressions", "16", "--json")
    got = {(r["mapper"], r["compression"]) for r in out["rows"]}
    assert got == {("uncompressed", 1), ("modulo", 16), ("double", 16), ("frequency", 16), ("learned", 16)}
    for r in out["rows"]:
        assert set(r) >= {"mapper", "compression", "logloss", "auc", "fit_s", "table_bytes"}
        assert 0 < r["logloss"] < 1.0 and 0.5 < r["auc"] <= 1.0
    same = {r["table_bytes"] for r in out["rows"] if r["compression"] == 16}
    assert len(same) == 1  # equal embedding memory at one ratio
    assert set(out["ordering"]) == {"16"}
