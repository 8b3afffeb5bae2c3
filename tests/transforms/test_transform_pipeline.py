"""The Beam steps on the DirectRunner: ProcessBatches + ApplyPlugins with real plugins."""

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that

from engine.config import config_from_dict
from engine.errors import PluginError
from storage.mapping_store import MappingStore
from streams.synthetic import SyntheticSpec, generate_payloads, synthetic_config_dict
from transforms.beam_steps import ApplyPlugins, ProcessBatches, RequiredColumns, _ProcessFn, reload_due
from transforms.elements import Reason, Stage, id_column
from transforms.mappers import DoubleHashMapper, MappingSet, ModuloMapper
from transforms.plugin_api import from_record_batch, map_batches, to_record_batch, with_column
from transforms.process import TransformSpec, output_schema, process_batch, source_batch

SYN = SyntheticSpec(num_dense=2, num_sparse=3, cardinality=40)


def _options():
    return PipelineOptions(["--runner=DirectRunner"])


@pytest.fixture
def setup(tmp_path):
    cfg = config_from_dict(synthetic_config_dict(SYN, rows=64))
    spec = TransformSpec.from_config(cfg)
    store = MappingStore(tmp_path / "mappings")
    ms = MappingSet(3, {s.name: (DoubleHashMapper(64) if s.name == "c2" else ModuloMapper(64)) for s in cfg.schema.sparse})
    store.save(ms)
    payloads = generate_payloads(SYN, 90, bad_fraction=0.1)
    batches = [source_batch(payloads[i:i + 30], topic="ev", partition=p, start_offset=i)
               for p, i in enumerate(range(0, 90, 30))]
    return spec, ms, store, batches


def _clip(rb):
    return with_column(rb, "i1", pc.min_element_wise(rb.column("i1"), pa.scalar(1.0, pa.float32())))


class DropPositives(beam.PTransform):
    """A plain user PTransform (no helper): drops the positive rows with rb.filter."""

    def expand(self, pcoll):
        return pcoll | beam.Map(lambda rb: rb.filter(pc.equal(rb.column("label"), 0.0)))


def _explode_on_partition_1(rb):
    if rb.schema.metadata[b"headrace.partition"] == b"1":
        raise ValueError("cannot handle partition 1")
    return rb


def test_process_and_plugins_keep_the_accounting(setup):
    spec, ms, store, batches = setup
    required = output_schema(spec, ms)

    def check(outputs):
        assert len(outputs) == 3
        for pb in sorted(outputs, key=lambda p: p.partition):
            assert pb.read == 30 and pb.mapping_version == 3 and pb.topic == "ev"
            assert pb.batch.num_rows + len(pb.dead_letters) + len(pb.filtered_offsets) == 30
            offs = sorted(pb.batch.column("_offset").to_pylist() + [d.offset for d in pb.dead_letters]
                          + pb.filtered_offsets.tolist())
            assert offs == list(range(pb.start_offset, pb.end_offset))
            assert pb.batch.schema.field("c2").type == pa.list_(pa.int64())
            if pb.partition == 1:
                plugin_dead = [d for d in pb.dead_letters if d.reason is Reason.PLUGIN_ERROR]
                assert plugin_dead and pb.batch.num_rows == 0
                assert all(d.stage is Stage.PLUGIN and "partition 1" in d.detail and d.raw.startswith(b"{")
                           for d in plugin_dead)
            else:
                assert pb.batch.num_rows > 0
                assert pc.max(pb.batch.column("i1")).as_py() <= 1.0
                assert pc.all(pc.equal(pb.batch.column("label"), 0.0)).as_py()
            assert any(d.reason is not Reason.PLUGIN_ERROR for d in pb.dead_letters)

    with BeamTestPipeline(options=_options()) as p:
        out = (p | beam.Create(batches)
               | ProcessBatches(spec, store)
               | ApplyPlugins([("clip", map_batches(_clip, name="clip")), ("drop-pos", DropPositives()),
                               ("explode", map_batches(_explode_on_partition_1, name="explode"))],
                              required=required))
        assert_that(out, check)


class Rebuild(beam.PTransform):
    """A broken plugin: rebuilds the batch from Python dicts, losing the metadata."""

    def expand(self, pcoll):
        return pcoll | beam.Map(lambda rb: pa.RecordBatch.from_pylist(rb.to_pylist()))


def test_plugin_that_drops_metadata_is_named(setup):
    spec, ms, store, batches = setup
    with pytest.raises(Exception) as ei:
        with BeamTestPipeline(options=_options()) as p:
            _ = p | beam.Create(batches[:1]) | ProcessBatches(spec, store) | ApplyPlugins([("rebuild", Rebuild())])
    assert "plugin 'rebuild'" in str(ei.value) and "metadata" in str(ei.value)


def test_plugin_output_checks(setup):
    spec, ms, _, batches = setup
    pb = process_batch(batches[0], spec, ms)
    rb = to_record_batch(pb)
    back = from_record_batch(rb)
    assert back.batch.equals(pb.batch) and back.dead_letters == pb.dead_letters
    assert np.array_equal(back.filtered_offsets, np.sort(pb.filtered_offsets))
    dropped = from_record_batch(rb.slice(2))
    assert dropped.batch.num_rows + len(dropped.dead_letters) + len(dropped.filtered_offsets) == pb.read
    from transforms.plugin_api import check_plugin_output
    with pytest.raises(PluginError, match="dropped column 'c1'"):
        check_plugin_output(rb.drop_columns(["c1"]), "p", output_schema(spec, ms))
    with pytest.raises(PluginError, match="changed column 'i1'"):
        check_plugin_output(with_column(rb, "i1", pc.cast(rb.column("i1"), pa.float64())), "p", output_schema(spec, ms))
    twice = pa.concat_tables([pa.Table.from_batches([rb])] * 2).combine_chunks().to_batches()[0]
    with pytest.raises(PluginError, match="repeated a row"):
        from_record_batch(twice.replace_schema_metadata(rb.schema.metadata), "dup")
    with pytest.raises(PluginError, match="not a beam.PTransform"):
        ApplyPlugins([("f", _clip)])


def test_required_columns_are_the_trainers(setup):
    spec, ms, _, batches = setup
    required = RequiredColumns.for_trainer(spec)
    assert required.typed.names == ["label", "i1", "i2"] and required.named == ("c1", "c2", "c3")
    # c2's rows are lists under the stored (double) mapper, int64 under the default one: a
    # re-fit may switch between them mid-stream, so both pass
    for mappings in (ms, MappingSet.default(spec.schema)):
        rb = to_record_batch(process_batch(batches[0], spec, mappings))
        assert required.check(rb, "p") is rb
    for column in ("label", "i2", "c2"):
        with pytest.raises(PluginError, match=f"plugin 'p' dropped column '{column}'"):
            required.check(rb.drop_columns([column]), "p")
    with pytest.raises(PluginError, match="plugin 'p' changed column 'i1'"):
        required.check(with_column(rb, "i1", pc.cast(rb.column("i1"), pa.float64())), "p")
    assert required.check(rb.drop_columns([id_column("c1")]), "p").num_rows == rb.num_rows  # not read by the trainer
    with pytest.raises(TypeError, match="MappingStore"):
        ProcessBatches(spec, "/a/mappings/dir")  # a directory is storage's business


def test_dofn_picks_up_a_newer_mapping_version(setup, tmp_path):
    spec, ms, _, batches = setup
    store = MappingStore(tmp_path / "fresh")
    fn = _ProcessFn(spec, store, reload_every_s=0.0, default_mapper="modulo")
    fn.setup()
    assert next(iter(fn.process(batches[0]))).mapping_version == 0  # none stored: default set
    store.save(MappingSet(1, {k: ModuloMapper(64) for k in ms.mappers}))
    assert next(iter(fn.process(batches[0]))).mapping_version == 1
    assert reload_due(10.0, 0.0, 10.0) and not reload_due(9.9, 0.0, 10.0)


def test_coders_round_trip(setup):
    from transforms.beam_steps import ProcessedBatchCoder, SourceBatchCoder

    spec, ms, _, batches = setup
    sb = batches[1]
    back = SourceBatchCoder().decode(SourceBatchCoder().encode(sb))
    assert back.records.equals(sb.records) and (back.topic, back.partition, back.start_offset, back.end_offset,
                                                back.partition_start) == ("ev", 1, 30, 60, 30)
    pb = process_batch(sb, spec, ms)
    assert pb.dead_letters
    c = ProcessedBatchCoder()
    again = c.decode(c.encode(pb))
    assert again.batch.equals(pb.batch) and again.dead_letters == pb.dead_letters
    assert np.array_equal(again.filtered_offsets, pb.filtered_offsets)
    assert (again.read, again.mapping_version, again.end_offset) == (pb.read, pb.mapping_version, pb.end_offset)
    assert beam.coders.registry.get_coder(type(pb)).__class__ is ProcessedBatchCoder
    empty = process_batch(source_batch([]), spec, ms)
    assert c.decode(c.encode(empty)).batch.schema == empty.batch.schema


def test_batch_pcollections_use_our_coders_and_size_them_without_encoding(setup, monkeypatch):
    from streams.records import SourceBatch
    from transforms.beam_steps import ProcessBatches, ProcessedBatchCoder, SourceBatchCoder

    spec, ms, _, batches = setup
    with beam.Pipeline() as p:
        src = p | beam.Create(batches[:1]).with_output_types(SourceBatch)
        out = src | ProcessBatches(spec)
        # Typed, so Beam encodes with the registered coders, not with pickle.
        assert beam.coders.registry.get_coder(out.element_type).__class__ is ProcessedBatchCoder
    # Beam samples element sizes for its metrics; estimating must not encode the batch.
    sb = batches[1]
    pb = process_batch(sb, spec, ms)

    def no_encode(self, value):
        raise AssertionError("estimate_size encoded the batch")

    monkeypatch.setattr(SourceBatchCoder, "encode", no_encode)
    monkeypatch.setattr(ProcessedBatchCoder, "encode", no_encode)
    assert SourceBatchCoder().estimate_size(sb) >= sb.records.nbytes > 0
    assert ProcessedBatchCoder().estimate_size(pb) >= pb.batch.nbytes > 0
