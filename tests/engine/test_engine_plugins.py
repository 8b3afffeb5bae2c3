"""Plugins resolve from 'module:attr' or an entry-point name, with clear errors otherwise."""

from __future__ import annotations

import sys
import types

import apache_beam as beam
import pyarrow as pa
import pytest

from engine.config import config_from_dict
from engine.errors import PluginError
from engine.pipeline import plugin_step
from engine.plugins import load_plugin, load_plugins
from examples.plugins import ClipDense, clip_dense
from streams.synthetic import SyntheticSpec, generate_payloads, synthetic_config_dict
from transforms.mappers import MappingSet
from transforms.process import TransformSpec, process_batch, source_batch


@pytest.fixture
def plugin_module():
    mod = types.ModuleType("hr_test_plugins")
    mod.INSTANCE = ClipDense(low=0.0, high=1.0)
    mod.Cls = ClipDense
    mod.factory = lambda: ClipDense(low=-1.0, high=1.0)
    mod.needs_args = lambda low: ClipDense(low=low)
    mod.not_a_transform = 42
    mod.returns_wrong = lambda: "nope"
    mod.DropDense = DropColumn
    sys.modules[mod.__name__] = mod
    yield mod.__name__
    del sys.modules[mod.__name__]


def test_instance_class_and_factory(plugin_module):
    assert load_plugin(f"{plugin_module}:INSTANCE").high == 1.0
    assert isinstance(load_plugin(f"{plugin_module}:Cls"), ClipDense)
    assert load_plugin(f"{plugin_module}:factory").low == -1.0
    assert [label for label, _ in load_plugins([f"{plugin_module}:Cls", "examples.plugins:ClipDense"])] == [
        f"{plugin_module}:Cls", "examples.plugins:ClipDense"]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:needs_args", "needs arguments ['low']"),
        ("{mod}:not_a_transform", "is not a beam.PTransform"),
        ("{mod}:returns_wrong", "returned str, not a beam.PTransform"),
        ("no-such-entry-point", "no entry point of that name"),
    ],
)
def test_errors(plugin_module, spec, fragment):
    with pytest.raises(PluginError) as err:
        load_plugin(spec.format(mod=plugin_module))
    assert fragment in str(err.value)


class DropColumn(beam.PTransform):
    """A broken plugin: drops a column the trainer reads (the configured dense ``i1``)."""

    def __init__(self, column: str = "i1"):
        super().__init__()
        self.column = column

    def expand(self, batches):
        return batches | beam.Map(lambda rb, c=self.column: rb.drop_columns([c]))


def test_a_plugin_dropping_a_configured_column_fails_naming_both(plugin_module):
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    spec = SyntheticSpec(num_dense=2, num_sparse=2, cardinality=50)
    doc = synthetic_config_dict(spec, rows=32)
    doc["pipeline"] = {"plugins": ["examples.plugins:ClipDense", f"{plugin_module}:DropDense"]}
    cfg = config_from_dict(doc)
    pb = process_batch(source_batch(generate_payloads(spec, 20)), TransformSpec.from_config(cfg),
                       MappingSet.default(cfg.schema))
    step = plugin_step(cfg)
    with pytest.raises(PluginError, match=f"plugin '{plugin_module}:DropDense' dropped column 'i1'"):
        with beam.Pipeline(runner=FnApiRunner()) as p:
            _ = p | beam.Create([pb]) | step
    assert plugin_step(config_from_dict(synthetic_config_dict(spec, rows=32))) is None


def test_clip_dense_keeps_metadata_and_label():
    rb = pa.RecordBatch.from_pydict({"label": pa.array([1.0, 0.0], pa.float32()), "x": pa.array([5.0, -7.0], pa.float32()),
                                     "c": pa.array([3, 4], pa.int64())}).replace_schema_metadata({b"headrace.k": b"v"})
    out = clip_dense(rb, -3.0, 3.0, ("label",))
    assert out.column("x").to_pylist() == [3.0, -3.0]
    assert out.column("label").to_pylist() == [1.0, 0.0]
    assert out.column("c").to_pylist() == [3, 4]
    assert out.schema.metadata == {b"headrace.k": b"v"}
    assert out.schema.field("x").type == pa.float32()


def test_clip_dense_in_a_pipeline():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to

    rb = pa.RecordBatch.from_pydict({"x": pa.array([5.0, 0.5], pa.float32())})
    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create([rb]) | ClipDense() | beam.Map(lambda b: b.column("x").to_pylist())
        assert_that(out, equal_to([[3.0, 0.5]]))


def test_entry_point_of_the_installed_package():
    # pyproject.toml registers examples.plugins:ClipDense as "example-clip-dense"
    assert isinstance(load_plugin("example-clip-dense"), ClipDense)
