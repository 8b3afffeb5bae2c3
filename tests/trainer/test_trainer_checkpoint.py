"""Atomic checkpoints: round trip, retention of the last K, shape and optimizer checks."""

import dataclasses
import os

import pytest
import torch
from torch import nn

from engine.config import config_from_dict
from engine.errors import CheckpointError
from trainer.batch import Jagged
from trainer.checkpoint import CheckpointManager, _check_compatible
from trainer.config import TrainerConfig
from trainer.data import Cursor
from trainer.embedding import CollectionCapabilities, EmbeddingBagCollection
from trainer.metrics import ProgressiveMetrics
from trainer.model import DLRM, model_shape, tables_from_config
from trainer.optim import build_optimizer


def _cfg(tmp_path, **trainer):
    return config_from_dict({
        "schema": {"dense": [{"name": "x"}], "sparse": [{"name": "u", "rows": 20}]},
        "trainer": {"embedding_dim": 4, "bottom_mlp": [4], "top_mlp": [4],
                    "checkpoint_dir": str(tmp_path / "ck"), "metrics_window": 50, **trainer},
    })


def _parts(cfg, embeddings=None):
    model = DLRM.from_config(cfg, embeddings)
    opt = build_optimizer(cfg.trainer.dense_optimizer_kind, model.parameters(), cfg.trainer.dense_lr)
    return model, opt, ProgressiveMetrics(cfg.trainer.metrics_window)


def _step(model, opt, metrics, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(8, 1, generator=g)
    sparse = {"u": Jagged(torch.randint(0, 20, (8,), generator=g), torch.arange(9))}
    labels = (torch.rand(8, generator=g) < 0.5).float()
    opt.zero_grad()
    logits = model(dense, sparse)
    nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    opt.step()
    metrics.update(logits.detach(), labels)


def test_round_trip_restores_everything(tmp_path):
    cfg = _cfg(tmp_path)
    model, opt, metrics = _parts(cfg)
    for s in range(3):
        _step(model, opt, metrics, s)
    mgr = CheckpointManager(cfg.trainer.checkpoint_dir, cfg)
    path = mgr.save(model, opt, cursor=Cursor(4, 17), metrics=metrics,
                    counters={"trained_batches": 3, "trained_samples": 24, "mapping_version": 2})
    assert path.name == "ckpt-000000000003.pt"
    assert not [p for p in os.listdir(path.parent) if p.startswith(".tmp")]

    model2, opt2, metrics2 = _parts(cfg)
    loaded = CheckpointManager(cfg.trainer.checkpoint_dir, cfg).load(model2, opt2, metrics2)
    assert loaded.cursor == Cursor(4, 17) and loaded.counters["mapping_version"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k])
    assert metrics2.summary() == metrics.summary()
    # the restored optimizer continues identically
    _step(model, opt, metrics, 9)
    _step(model2, opt2, metrics2, 9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k])


def test_keeps_last_k_and_loads_newest(tmp_path):
    cfg = _cfg(tmp_path)
    model, opt, metrics = _parts(cfg)
    mgr = CheckpointManager(cfg.trainer.checkpoint_dir, cfg, keep=2)
    for b in (5, 10, 15):
        mgr.save(model, opt, cursor=Cursor(b, 0), metrics=metrics,
                 counters={"trained_batches": b, "trained_samples": 0, "mapping_version": None})
    assert [p.name for p in mgr.checkpoints()] == ["ckpt-000000000010.pt", "ckpt-000000000015.pt"]
    assert mgr.load(*_parts(cfg)).cursor == Cursor(15, 0)


def test_empty_directory_loads_nothing(tmp_path):
    cfg = _cfg(tmp_path)
    assert CheckpointManager(cfg.trainer.checkpoint_dir, cfg).load(*_parts(cfg)) is None


def test_a_checkpoint_of_an_earlier_default_names_the_setting_that_resumes_it(tmp_path):
    """The default top MLP was [64, 32]: a checkpoint trained under it, resumed by a config
    that leaves top_mlp unset, fails with the setting that brings the old shape back."""
    old = _cfg(tmp_path, top_mlp=[64, 32])
    model, opt, metrics = _parts(old)
    CheckpointManager(old.trainer.checkpoint_dir, old).save(
        model, opt, cursor=Cursor(), metrics=metrics,
        counters={"trained_batches": 1, "trained_samples": 8, "mapping_version": 0})
    unset = _cfg(tmp_path)
    unset = dataclasses.replace(unset, trainer=dataclasses.replace(unset.trainer, top_mlp=TrainerConfig().top_mlp))
    assert list(unset.trainer.top_mlp) != [64, 32]
    with pytest.raises(CheckpointError, match=r"top_mlp: checkpoint \[64, 32\] vs config \[32\].*"
                                              r"resume it with \[trainer\] top_mlp = \[64, 32\]"):
        CheckpointManager(unset.trainer.checkpoint_dir, unset).load(*_parts(unset))
    # A checkpoint from before [model] existed gets the same setting beside the legacy ones.
    legacy = {k: v for k, v in model_shape(unset).items() if k not in ("kind", "wide", "normalize_dense", "interaction")}
    with pytest.raises(CheckpointError, match=r"wide = false and interaction = \"dot\" and \[trainer\] top_mlp = \[64, 32\]"):
        _check_compatible(tmp_path, {**legacy, "top_mlp": [64, 32]}, "x", model_shape(unset), "x")
    # Against a shape that is not today's default the plain hint stays.
    other = _cfg(tmp_path, top_mlp=[5])
    with pytest.raises(CheckpointError, match="restore the old config"):
        CheckpointManager(other.trainer.checkpoint_dir, other).load(*_parts(other))


def test_shape_and_optimizer_mismatch_are_named(tmp_path):
    cfg = _cfg(tmp_path)
    model, opt, metrics = _parts(cfg)
    CheckpointManager(cfg.trainer.checkpoint_dir, cfg).save(
        model, opt, cursor=Cursor(), metrics=metrics,
        counters={"trained_batches": 1, "trained_samples": 8, "mapping_version": 0})
    wider = _cfg(tmp_path, top_mlp=[5])
    with pytest.raises(CheckpointError, match=r"top_mlp: checkpoint \[4\] vs config \[5\]"):
        CheckpointManager(wider.trainer.checkpoint_dir, wider).load(*_parts(wider))
    adam = _cfg(tmp_path, optimizer="adam")
    with pytest.raises(CheckpointError,
                       match="optimizer 'sparse=rowwise_adagrad,dense=adagrad', config says 'sparse=adam,dense=adam'"):
        CheckpointManager(adam.trainer.checkpoint_dir, adam).load(*_parts(adam))
    other_window = _cfg(tmp_path, metrics_window=51)
    with pytest.raises(CheckpointError, match="metrics_window"):
        CheckpointManager(other_window.trainer.checkpoint_dir, other_window).load(*_parts(other_window))


def test_damaged_file_is_a_checkpoint_error(tmp_path):
    cfg = _cfg(tmp_path)
    mgr = CheckpointManager(cfg.trainer.checkpoint_dir, cfg)
    (mgr.directory / "ckpt-000000000007.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="ckpt-000000000007.pt cannot be read"):
        mgr.load(*_parts(cfg))


class SelfCheckpointing(EmbeddingBagCollection):
    """A collection that stores its rows through the checkpoint hooks (as SSD-backed and
    sharded collections do), here as a tensor under its own key; it says so in its capabilities."""

    capabilities = CollectionCapabilities(own_checkpoint_state=True)

    def checkpoint_state(self):
        return {"rows": {n: b.weight.detach().clone() for n, b in self.bags.items()}}

    def load_checkpoint_state(self, state):
        with torch.no_grad():
            for n, w in state["rows"].items():
                self.bags[n].weight.copy_(w)


def test_collection_hooks_store_rows(tmp_path):
    cfg = _cfg(tmp_path)
    model, opt, metrics = _parts(cfg, SelfCheckpointing(tables_from_config(cfg)))
    _step(model, opt, metrics, 1)
    mgr = CheckpointManager(cfg.trainer.checkpoint_dir, cfg)
    path = mgr.save(model, opt, cursor=Cursor(), metrics=metrics,
                    counters={"trained_batches": 1, "trained_samples": 8, "mapping_version": 0})
    blob = torch.load(path, weights_only=True)
    assert not any(k.startswith("embeddings.") for k in blob["model"])
    model2, opt2, metrics2 = _parts(cfg, SelfCheckpointing(tables_from_config(cfg)))
    mgr.load(model2, opt2, metrics2)
    assert torch.equal(model2.embeddings.bags["u"].weight, model.embeddings.bags["u"].weight)
    with pytest.raises(CheckpointError, match="self-checkpointing"):
        mgr.load(*_parts(cfg))


def test_a_checkpoint_of_the_previous_format_says_how_to_go_on(tmp_path):
    cfg = _cfg(tmp_path)
    mgr = CheckpointManager(cfg.trainer.checkpoint_dir, cfg)
    torch.save({"format_version": 1, "model": {}, "optimizer_kind": "adagrad"},
               mgr.directory / "ckpt-000000000004.pt")
    with pytest.raises(CheckpointError, match="written by headrace 0.1.*new directory"):
        mgr.load(*_parts(cfg))
