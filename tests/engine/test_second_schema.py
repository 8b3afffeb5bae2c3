"""A log with other field names, other feature counts, an int id, a multi-valued feature and
filters works from config alone (examples/configs/shop_events.toml)."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
import tomllib

from tests.engine_helpers import cached_table, headrace, last_json, write_config

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "configs" / "shop_events.toml"


def _events(n: int) -> list[dict]:
    rng = random.Random(3)
    out = []
    for i in range(n):
        out.append({
            "bought": int(rng.random() < 0.3), "price": round(rng.uniform(0, 200), 2), "dwell_s": rng.randint(0, 600),
            "user": rng.randint(1, 10**12), "tags": [rng.randint(0, 10**6) for _ in range(rng.randint(0, 5))],
            "shop": f"shop-{rng.randint(1, 40)}", "at": 1_767_225_600_000 + i,
            "country": rng.choice(["DE", "AT", "CH", "FR", "US"]),
        })
    return out


def test_shop_schema_backfills_from_config_alone(tmp_path):
    doc = tomllib.loads(EXAMPLE.read_text())
    doc["cache"]["path"] = str(tmp_path / "cache")
    doc["trainer"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    cfg = write_config(tmp_path, doc)
    events = _events(2000)
    log = tmp_path / "shop.jsonl"
    log.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")

    res = headrace("backfill", "-c", str(cfg), "--from", str(log), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    summary = last_json(res.stdout)
    assert summary["read"] == 2000 and summary["dead_letters"] == 0
    in_country = [e for e in events if e["country"] in ("DE", "AT", "CH")]
    positives = sum(e["bought"] for e in in_country)
    # the country filter is exact; negatives are downsampled to about half, deterministically
    assert positives < summary["cached_rows"] < len(in_country)
    assert summary["filtered"] == 2000 - summary["cached_rows"]

    table = pa.Table.from_batches([b for _, _, b in cached_table(tmp_path / "cache")])
    assert table.num_rows == summary["cached_rows"]
    for name in ("bought", "price", "dwell_s", "user", "tags", "shop", "user.id", "tags.id", "shop.id"):
        assert name in table.column_names
    assert "country" not in table.column_names  # projected away: only configured features are kept
    assert pa.types.is_list(table.schema.field("tags").type) or pa.types.is_large_list(table.schema.field("tags").type)
    tags = table.column("tags").combine_chunks()
    assert all(0 <= r < 1000 for r in pa.compute.list_flatten(tags).to_pylist())
    users = table.column("user").to_numpy()
    assert ((users >= 0) & (users < 50_000)).all()

    # and the trainer trains on it
    res = headrace("train", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    assert last_json(res.stdout)["trained_samples"] == summary["cached_rows"]
