"""A plugin named in config (module:attr or entry point) changes the cached batches as
written, and the accounting stays exact."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest

from streams.synthetic import generate_payloads
from tests.engine_helpers import (
    SMALL_SPEC,
    cached_table,
    headrace,
    last_json,
    small_config_doc,
    write_config,
)

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def _dense(cache_path) -> np.ndarray:
    table = pa.Table.from_batches([b for _, _, b in cached_table(cache_path)])
    return np.stack([table.column(f"i{j + 1}").to_numpy() for j in range(SMALL_SPEC.num_dense)])


@pytest.mark.parametrize("plugin", ["examples.plugins:ClipDense", "example-clip-dense"])
def test_plugin_changes_cached_batches(tmp_path, plugin):
    log = tmp_path / "ev.jsonl"
    log.write_bytes(b"\n".join(generate_payloads(SMALL_SPEC, 2000)) + b"\n")
    plain = write_config(tmp_path, small_config_doc(tmp_path, cache="plain"), "plain.toml")
    clipped = write_config(tmp_path, small_config_doc(tmp_path, cache="clipped", pipeline={"plugins": [plugin]}),
                           "clipped.toml")
    results = {}
    for name, cfg in (("plain", plain), ("clipped", clipped)):
        res = headrace("backfill", "-c", str(cfg), "--from", str(log), "--json")
        assert res.returncode == 0, res.stderr[-4000:]
        results[name] = last_json(res.stdout)
    assert results["plain"]["cached_rows"] == results["clipped"]["cached_rows"] == 2000

    before, after = _dense(tmp_path / "plain"), _dense(tmp_path / "clipped")
    assert before.max() > 3.0  # log1p counts exceed the clip bound somewhere
    assert after.max() <= 3.0 and after.min() >= -3.0
    np.testing.assert_array_equal(after, np.clip(before, -3.0, 3.0))
    labels = lambda p: pa.Table.from_batches([b for _, _, b in cached_table(p)]).column("label")  # noqa: E731
    assert labels(tmp_path / "plain").equals(labels(tmp_path / "clipped"))  # the label is left alone


class DropLabel(beam.PTransform):
    """A broken plugin: drops the label column the trainer learns from."""

    def expand(self, batches):
        return batches | beam.Map(lambda rb: rb.drop_columns(["label"]))


def test_plugin_dropping_a_configured_column_fails_the_backfill(tmp_path):
    log = tmp_path / "ev.jsonl"
    log.write_bytes(b"\n".join(generate_payloads(SMALL_SPEC, 300)) + b"\n")
    plugin = f"{__name__}:DropLabel"
    cfg = write_config(tmp_path, small_config_doc(tmp_path, pipeline={"plugins": [plugin]}))
    res = headrace("backfill", "-c", str(cfg), "--from", str(log), "--json")
    assert res.returncode != 0
    assert f"PluginError: plugin '{plugin}' dropped column 'label'" in res.stderr, res.stderr[-4000:]
