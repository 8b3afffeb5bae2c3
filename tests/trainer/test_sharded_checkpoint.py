"""Sharded checkpoints refuse what they cannot load (the 4 -> 2 -> 1 resharding itself is
checked in test_sharded_train.py, where it shares the spawned process groups)."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import CheckpointError
from tests.trainer.test_sharded_train import TABLES, run_jobs

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="manifest"):
        run_jobs(tmp_path / "out", 1, [{"name": "x", "forced": {}, "steps": 1, "load": str(tmp_path / "ckpt")}])


def test_checkpoint_of_other_table_shapes_is_refused(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    run_jobs(tmp_path / "a", 1, [{"name": "save", "forced": {}, "steps": 1, "save": ckpt}])
    assert torch.load(tmp_path / "a" / "save.pt", weights_only=True)["layout"].keys() == TABLES.keys()
    # the same checkpoint against a model whose table "a" has more rows
    import tests.trainer.test_sharded_train as t

    monkeypatch.setitem(t.TABLES, "a", TABLES["a"] + 1)
    with pytest.raises(CheckpointError, match="'a'"):
        run_jobs(tmp_path / "b", 1, [{"name": "load", "forced": {}, "steps": 1, "load": ckpt}])


def test_checkpoint_of_another_sparse_optimizer_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_jobs(tmp_path / "a", 1, [{"name": "save", "forced": {}, "steps": 1, "save": ckpt}])
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert (manifest["sparse_optimizer"], manifest["sparse_steps"]) == ("rowwise_adagrad", 1)
    with pytest.raises(CheckpointError, match=r"sparse optimizer 'rowwise_adagrad'.*'adam'"):
        run_jobs(tmp_path / "b", 1, [{"name": "load", "forced": {}, "sparse": "adam", "steps": 1,
                                      "load": ckpt}])


def test_checkpoint_from_before_fused_shards_is_refused_clearly(tmp_path):
    """Format 1: shards were nn.Parameters of the dense torch optimizer; their state cannot
    become the sparse optimizer's, so the load says so instead of training on."""
    ckpt = str(tmp_path / "ckpt")
    run_jobs(tmp_path / "a", 1, [{"name": "save", "forced": {}, "steps": 1, "save": ckpt}])
    path = tmp_path / "ckpt" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"format 1.*sparse_optimizer.*new directory"):
        run_jobs(tmp_path / "b", 1, [{"name": "load", "forced": {}, "steps": 1, "load": ckpt}])
