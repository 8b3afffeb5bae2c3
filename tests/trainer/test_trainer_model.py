"""DLRM shapes, interaction arithmetic, deterministic init and config validation."""

import pytest
import torch

from engine.config import config_from_dict
from engine.errors import TrainerError
from trainer.batch import Jagged
from trainer.embedding import EmbeddingBagCollection, TableSpec
from trainer.model import DLRM, model_fingerprint


def _cfg(dense=2, sparse=(("u", 10, False), ("v", 7, True)), seed=0, interaction="dot_concat", **trainer):
    return config_from_dict({
        "model": {"interaction": interaction},
        "schema": {
            "dense": [{"name": f"d{i}"} for i in range(dense)],
            "sparse": [{"name": n, "rows": r, "multi": m} for n, r, m in sparse],
        },
        "trainer": {"embedding_dim": 4, "bottom_mlp": [8, 4], "top_mlp": [6], "seed": seed,
                    **trainer},
    })


def _sparse(b, names_rows, gen):
    out = {}
    for name, rows in names_rows:
        counts = torch.randint(0, 3, (b,), generator=gen)
        offsets = torch.zeros(b + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        out[name] = Jagged(torch.randint(0, rows, (int(offsets[-1]),), generator=gen), offsets)
    return out


@pytest.mark.parametrize("interaction,top_in", [
    ("dot", 4 + 3),  # dense vector (4) + pairs among 3 vectors (3)
    ("dot_concat", 4 + 3 + 2 * 4),  # ... + the 2 pooled embeddings of dim 4
])
def test_forward_shape_and_top_input_width(interaction, top_in):
    model = DLRM.from_config(_cfg(interaction=interaction))
    g = torch.Generator().manual_seed(1)
    out = model(torch.randn(5, 2, generator=g), _sparse(5, [("u", 10), ("v", 7)], g))
    assert out.shape == (5,)
    assert model.top[0].in_features == top_in


@pytest.mark.parametrize("interaction", ["dot", "dot_concat"])
def test_interaction_matches_brute_force(interaction):
    model = DLRM.from_config(_cfg(interaction=interaction))
    g = torch.Generator().manual_seed(2)
    d = torch.randn(3, 4, generator=g)
    e = torch.randn(3, 2, 4, generator=g)
    z = model.interact(d, e)
    vecs = [d, e[:, 0], e[:, 1]]
    pairs = []
    for i in range(3):
        for j in range(i + 1, 3):
            pairs.append((vecs[i] * vecs[j]).sum(1, keepdim=True))
    pooled = [e[:, 0], e[:, 1]] if interaction == "dot_concat" else []
    expected = torch.cat([d] + pairs + pooled, dim=1)
    torch.testing.assert_close(z, expected)


def test_concatenated_embeddings_take_the_pairs_dtype_under_autocast():
    """Under bf16 autocast the fp32 pooled rows join the bf16 dots as bf16 (the top MLP reads
    bf16 anyway): an fp32 block would make the whole [B, inputs] concatenation fp32."""
    model = DLRM.from_config(_cfg())
    g = torch.Generator().manual_seed(8)
    dense, sparse = torch.randn(6, 2, generator=g), _sparse(6, [("u", 10), ("v", 7)], g)
    pooled = model.embeddings(sparse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.interact(model.bottom(dense), pooled)
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), model.interact(model.bottom(dense), pooled), atol=0.05, rtol=0.02)


def test_init_is_deterministic_per_seed():
    a = DLRM.from_config(_cfg(seed=3)).state_dict()
    b = DLRM.from_config(_cfg(seed=3)).state_dict()
    c = DLRM.from_config(_cfg(seed=4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["top.0.weight"], c["top.0.weight"])
    assert not torch.equal(a["embeddings.bags.u.weight"], c["embeddings.bags.u.weight"])


@pytest.mark.parametrize("dense,sparse,top_in", [
    (0, (("u", 10, False), ("v", 7, False)), 1 + 2 * 4),  # two pooled vectors -> one pair + both vectors
    (0, (("u", 10, False),), 4),  # a single pooled vector feeds the top MLP directly
    (3, (), 4),  # dense only: bottom output
])
def test_degenerate_feature_sets(dense, sparse, top_in):
    model = DLRM.from_config(_cfg(dense=dense, sparse=sparse))
    assert model.top[0].in_features == top_in
    g = torch.Generator().manual_seed(5)
    out = model(torch.randn(4, dense, generator=g), _sparse(4, [(n, r) for n, r, _ in sparse], g))
    assert out.shape == (4,)
    assert torch.isfinite(out).all()


def test_gradients_reach_mlps_and_rows():
    model = DLRM.from_config(_cfg())
    g = torch.Generator().manual_seed(6)
    sp = _sparse(8, [("u", 10), ("v", 7)], g)
    model(torch.randn(8, 2, generator=g), sp).sum().backward()
    assert model.bottom[0].weight.grad.abs().sum() > 0
    assert model.top[-1].weight.grad.abs().sum() > 0
    used = sp["u"].values.unique()
    assert model.embeddings.bags["u"].weight.grad[used].abs().sum() > 0


def test_embeddings_must_match_schema_and_dim():
    cfg = _cfg()
    wrong_order = EmbeddingBagCollection([TableSpec("v", 7, 4), TableSpec("u", 10, 4)])
    with pytest.raises(TrainerError, match="order matters"):
        DLRM.from_config(cfg, wrong_order)
    wrong_dim = EmbeddingBagCollection([TableSpec("u", 10, 8), TableSpec("v", 7, 8)])
    with pytest.raises(TrainerError, match="embedding_dim"):
        DLRM.from_config(cfg, wrong_dim)


def test_dense_shape_is_checked():
    model = DLRM.from_config(_cfg())
    g = torch.Generator().manual_seed(7)
    with pytest.raises(TrainerError, match=r"\[B, 2\]"):
        model(torch.randn(4, 3), _sparse(4, [("u", 10), ("v", 7)], g))


def test_empty_bottom_needs_dense_count_equal_dim():
    with pytest.raises(TrainerError, match="bottom_mlp"):
        DLRM.from_config(_cfg(dense=3, bottom_mlp=[]))


def test_fingerprint_tracks_shape_fields_only():
    assert model_fingerprint(_cfg()) == model_fingerprint(_cfg(learning_rate=0.5))
    assert model_fingerprint(_cfg()) != model_fingerprint(_cfg(top_mlp=[7]))
    assert model_fingerprint(_cfg()) != model_fingerprint(_cfg(interaction="dot"))
