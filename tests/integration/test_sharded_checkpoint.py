"""Sharded checkpoints refuse what they cannot load (the 4 -> 2 -> 1 resharding itself is
checked in test_sharded_train.py, where it shares the spawned process groups)."""

from __future__ import annotations

import pytest
import torch

from engine.errors import CheckpointError
from tests.integration.test_sharded_train import TABLES, run_jobs


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="manifest"):
        run_jobs(tmp_path / "out", 1, [{"name": "x", "forced": {}, "steps": 1, "load": str(tmp_path / "ckpt")}])


def test_checkpoint_of_other_table_shapes_is_refused(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    run_jobs(tmp_path / "a", 1, [{"name": "save", "forced": {}, "steps": 1, "save": ckpt}])
    assert torch.load(tmp_path / "a" / "save.pt", weights_only=True)["layout"].keys() == TABLES.keys()
    # the same checkpoint against a model whose table "a" has more rows
    import tests.integration.test_sharded_train as t

    monkeypatch.setitem(t.TABLES, "a", TABLES["a"] + 1)
    with pytest.raises(CheckpointError, match="'a'"):
        run_jobs(tmp_path / "b", 1, [{"name": "load", "forced": {}, "steps": 1, "load": ckpt}])
