"""Embedding-row migration at a mapping version boundary (trainer.migrate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import config_from_dict
from engine.errors import TrainerError
from trainer.migrate import migrate_model, migrate_table
from trainer.model import DLRM
from trainer.optim import build_optimizer
from transforms.hash_fit import IdStats, LearnedFitParams, fit_learned
from transforms.mappers import DoubleHashMapper, ModuloMapper


def reference(weight, old, new, ids, counts, state=False):
    """Plain-Python access-weighted means, row by row."""
    rows = weight.shape[0]
    old_rows = np.asarray(old.map(ids)).reshape(-1, ids.size)
    new_rows = np.asarray(new.map(ids)).reshape(-1, ids.size)
    w = np.asarray(counts, np.float64) + 1e-6
    vals = []
    for i in range(ids.size):
        v = sum(weight[r[i]].astype(np.float64) for r in old_rows)
        vals.append(v / old_rows.shape[0] if state else v)
    vals = np.array(vals)
    out = np.zeros((rows, weight.shape[1]))
    glob = (vals * w[:, None]).sum(0) / w.sum()
    for r in range(rows):
        members = [(i, k) for k in range(new_rows.shape[0]) for i in range(ids.size) if new_rows[k][i] == r]
        if members:
            out[r] = sum(vals[i] * w[i] for i, _ in members) / sum(w[i] for i, _ in members)
        else:
            out[r] = glob
    return out if state else out / new_rows.shape[0]


def stats(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)
    counts = rng.integers(1, 100, n).astype(np.float64)
    return IdStats(ids, counts, rng.binomial(counts.astype(int), 0.3).astype(float))


@pytest.mark.parametrize("old_kind", ["modulo", "double"])
def test_migrate_table_matches_reference(old_kind):
    rows = 40
    st = stats(300)
    old = ModuloMapper(rows) if old_kind == "modulo" else DoubleHashMapper(rows)
    new = fit_learned(st, rows, LearnedFitParams(hot_fraction=0.25, reserve_fraction=0.1))
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, 4, generator=g)
    state = torch.rand(rows, 4, generator=g)
    w0, s0 = weight.numpy().copy(), state.numpy().copy()
    migrate_table(weight, [state], old, new, st.ids, st.counts, chunk_ids=64)
    np.testing.assert_allclose(weight.numpy(), reference(w0, old, new, st.ids, st.counts), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.numpy(), reference(s0, old, new, st.ids, st.counts, state=True),
                               rtol=1e-5, atol=1e-6)
    # a hot id owns its row: its embedding is carried over exactly
    hot_id = st.ids[np.argmax(st.counts)]
    before = sum(w0[r] for r in np.asarray(old.map(np.array([hot_id]))).reshape(-1))
    after = weight.numpy()[new.map(np.array([hot_id]))[0]]
    np.testing.assert_allclose(after, before, rtol=1e-5)


def test_migrate_into_two_lookups_preserves_summed_value():
    rows = 64
    st = stats(20, seed=1)
    old = fit_learned(st, rows)  # every id its own row
    new = DoubleHashMapper(rows)
    weight = torch.randn(rows, 3, generator=torch.Generator().manual_seed(1))
    w0 = weight.clone()
    migrate_table(weight, [], old, new, st.ids, st.counts)
    np.testing.assert_allclose(weight.numpy(), reference(w0.numpy(), old, new, st.ids, st.counts),
                               rtol=1e-5, atol=1e-6)


def test_migrate_model_moves_tables_and_adagrad_state():
    cfg = config_from_dict({"schema": {"dense": [{"name": "x"}],
                                       "sparse": [{"name": "a", "rows": 32}, {"name": "b", "rows": 16}]},
                            "trainer": {"embedding_dim": 4, "bottom_mlp": [4]}})
    model = DLRM.from_config(cfg)
    opt = build_optimizer(cfg.trainer.dense_optimizer_kind, model.parameters(), 0.1)
    from trainer.batch import Jagged
    out = model(torch.randn(8, 1), {"a": Jagged(torch.arange(8), torch.arange(9)),
                                    "b": Jagged(torch.arange(8), torch.arange(9))})
    out.sum().backward()
    opt.step()
    st = stats(100, seed=2)
    old = {"a": ModuloMapper(32), "b": ModuloMapper(16)}
    new = {"a": fit_learned(st, 32), "b": old["b"]}
    wa = model.embeddings.bags["a"].weight
    wb0 = model.embeddings.bags["b"].weight.detach().clone()
    sa0 = opt.state[wa]["sum"].clone()
    expected = reference(wa.detach().numpy().copy(), old["a"], new["a"], st.ids, st.counts)
    report = migrate_model(model, opt, old, new, {"a": (st.ids, st.counts)})
    assert report == {"a": 100}
    np.testing.assert_allclose(wa.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.embeddings.bags["b"].weight, wb0)  # unchanged mapper: untouched
    assert not torch.equal(opt.state[wa]["sum"], sa0)
    np.testing.assert_allclose(opt.state[wa]["sum"].numpy(),
                               reference(sa0.numpy(), old["a"], new["a"], st.ids, st.counts, state=True),
                               rtol=1e-5, atol=1e-6)


def test_migrate_rejects_mismatched_shapes():
    with pytest.raises(TrainerError, match="rows equal"):
        migrate_table(torch.zeros(10, 2), [], ModuloMapper(10), ModuloMapper(12), np.zeros(0, np.int64), np.zeros(0))
    with pytest.raises(TrainerError, match="optimizer state"):
        migrate_table(torch.zeros(10, 2), [torch.zeros(11, 2)], ModuloMapper(10), ModuloMapper(10),
                      np.zeros(0, np.int64), np.zeros(0))


def test_migrate_model_moves_fused_rows_and_rowwise_state_in_place():
    from trainer.batch import Jagged
    from trainer.embedding import collections_of
    from trainer.model import fused_embeddings_from_config

    cfg = config_from_dict({"schema": {"dense": [{"name": "x"}],
                                       "sparse": [{"name": "a", "rows": 32}, {"name": "b", "rows": 16}]},
                            "trainer": {"embedding_dim": 4, "bottom_mlp": [4]}})
    model = DLRM.from_config(cfg, fused_embeddings_from_config(cfg))
    emb = model.embeddings
    out = model(torch.randn(8, 1), {"a": Jagged(torch.arange(8), torch.arange(9)),
                                    "b": Jagged(torch.arange(8) * 2, torch.arange(9))})
    out.sum().backward()
    collections = collections_of(model)  # the embeddings, and the wide part's 1-wide rows
    for collection in collections.values():
        collection.sparse_step()
    st = stats(100, seed=2)
    old = {"a": ModuloMapper(32), "b": ModuloMapper(16)}
    new = {"a": fit_learned(st, 32), "b": old["b"]}
    wide0 = {name: c.per_table_weights()["a"].clone() for name, c in collections.items()}
    wa0 = emb.per_table_weights()["a"].clone()
    sa0 = emb.state_sum[:32].clone()
    b0 = emb.per_table_weights()["b"].clone()
    report = migrate_model(model, None, old, new, {"a": (st.ids, st.counts)})
    assert report == {"a": 100}
    np.testing.assert_allclose(emb.per_table_weights()["a"].numpy(),
                               reference(wa0.numpy(), old["a"], new["a"], st.ids, st.counts),
                               rtol=1e-5, atol=1e-6)
    # the row-wise accumulator (one value per row) moves like a one-column state table
    np.testing.assert_allclose(emb.state_sum[:32].numpy(),
                               reference(sa0[:, None].numpy(), old["a"], new["a"], st.ids, st.counts,
                                         state=True)[:, 0], rtol=1e-5, atol=1e-6)
    assert torch.equal(emb.per_table_weights()["b"], b0)
    for name, collection in collections.items():  # every collection's table "a" moved alike
        np.testing.assert_allclose(collection.per_table_weights()["a"].numpy(),
                                   reference(wide0[name].numpy(), old["a"], new["a"], st.ids, st.counts),
                                   rtol=1e-5, atol=1e-6)
    # and the checkpoint reader splits the fused buffer back into tables
    from trainer.migrate import _checkpoint_table_rows
    rows = _checkpoint_table_rows(model.state_dict(), cfg)
    assert torch.equal(rows["a"], emb.per_table_weights()["a"]) and rows["b"].shape == (16, 4)
