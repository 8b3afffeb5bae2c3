"""Sparse embedding gradients give the same updates as dense ones for Adagrad and SGD."""

import pytest
import torch
from torch import nn

from engine.config import OptimizerKind, config_from_dict
from trainer.batch import Jagged
from trainer.model import DLRM
from trainer.optim import build_optimizer, supports_sparse_gradients, use_sparse_gradients


def _cfg():
    return config_from_dict({
        "schema": {"dense": [{"name": "x"}],
                   "sparse": [{"name": "u", "rows": 30}, {"name": "v", "rows": 5, "multi": True}]},
        "trainer": {"embedding_dim": 4, "bottom_mlp": [4], "top_mlp": [4]},
    })


def _train(kind, sparse, steps=5):
    model = DLRM.from_config(_cfg())
    if sparse:
        assert use_sparse_gradients(model) == 4  # u, v and their first-order (1-wide) bags
    opt = build_optimizer(kind, model.parameters(), 0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        sp = {"u": Jagged(torch.randint(0, 30, (16,), generator=g), torch.arange(17)),
              "v": Jagged(torch.randint(0, 5, (20,), generator=g),
                          torch.tensor([0] + sorted(torch.randint(0, 21, (15,), generator=g).tolist()) + [20]))}
        labels = (torch.rand(16, generator=g) < 0.5).float()
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(
            model(torch.randn(16, 1, generator=g), sp), labels).backward()
        if sparse:
            assert model.embeddings.bags["u"].weight.grad.is_sparse
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            opt.step()
    return model.state_dict()


@pytest.mark.parametrize("kind", [OptimizerKind.ADAGRAD, OptimizerKind.SGD])
def test_sparse_equals_dense(kind):
    assert supports_sparse_gradients(kind)
    dense, sparse = _train(kind, False), _train(kind, True)
    for k in dense:
        torch.testing.assert_close(sparse[k], dense[k], rtol=1e-5, atol=1e-6)


def test_adam_keeps_dense_gradients():
    assert not supports_sparse_gradients(OptimizerKind.ADAM)
    state = _train(OptimizerKind.ADAM, False, steps=2)
    assert all(torch.isfinite(v).all() for v in state.values())
