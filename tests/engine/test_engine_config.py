"""Config: TOML -> frozen typed tree; every mistake names the key and the file."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import (
    EventFormat,
    HeadraceConfig,
    KafkaClientKind,
    config_from_dict,
    load_config,
    replace_in,
)
from engine.errors import ConfigError


def _doc(**sections):
    doc = {"schema": {"dense": [{"name": "x"}], "sparse": [{"name": "c", "rows": 10}]}}
    doc.update(sections)
    return doc


def test_defaults_and_types():
    cfg = config_from_dict(_doc(source={"topics": ["a", "b"], "client": "confluent"}))
    assert cfg.source.topics == ("a", "b")
    assert cfg.source.client is KafkaClientKind.CONFLUENT
    assert cfg.schema.format is EventFormat.JSON
    assert cfg.schema.feature_names == ("x", "c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.source.bootstrap = "elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize(
    "doc, fragment",
    [
        (_doc(cache={"max_byte": 1}), "[cache] unknown key(s) 'max_byte'"),
        (_doc(nope={}), "unknown key(s) 'nope'"),
        (_doc(source={"max_batch_records": "many"}), "[source.max_batch_records] expected an integer"),
        (_doc(source={"client": "librdkafka"}), "is not one of 'auto', 'kafka-python', 'confluent'"),
        (_doc(source={"topics": []}), "topics must name at least one topic"),
        ({"schema": {"dense": [{"name": "x"}, {"name": "x"}]}}, "repeated: ['x']"),
        ({"schema": {"format": "tsv", "dense": [{"name": "x"}]}}, "needs columns"),
        ({"schema": {"sparse": [{"name": "c", "rows": 0}]}}, "rows must be >= 1"),
        (_doc(trainer={"embedding_dim": 8}), "bottom_mlp must end in embedding_dim (8)"),
        (_doc(filter={"negative_keep_rate": 0}), "negative_keep_rate must be in (0, 1]"),
        (_doc(cache={"max_bytes": True}), "expected an integer"),
    ],
)
def test_errors_name_key_and_file(doc, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, file="my.toml")
    assert fragment in str(err.value)
    assert str(err.value).startswith("my.toml:")


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[source\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_example_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert isinstance(cfg, HeadraceConfig), path


def test_replace_in():
    cfg = config_from_dict(_doc())
    cfg2 = replace_in(cfg, "cache", path="/elsewhere")
    assert cfg2.cache.path == "/elsewhere" and cfg.cache.path != "/elsewhere"
