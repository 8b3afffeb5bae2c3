"""The dense optimizer named by ``[trainer] dense_optimizer``, and sparse gradients for an
``nn.EmbeddingBag`` collection passed to the trainer.

The trainer's own collections (fused, sharded, SSD-cached) keep their rows in buffers and
update them with their sparse optimizer (``trainer.sparse_optim``); the dense optimizer never
sees them. A plain ``trainer.embedding.EmbeddingBagCollection`` handed in by a caller has its
rows as parameters, which the dense optimizer then trains: with dense gradients every step
would read and write every row (measured in the first release: ~950 ms per 512-sample step
over 26 x 100k x 16 rows on one CPU core), so under Adagrad and SGD, which give the same
update from sparse gradients, its bags are switched to sparse gradients. Adam does not accept
sparse gradients, and its moment decay changes untouched rows too, so under Adam they stay
dense.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from trainer.config import OptimizerKind

__all__ = ["build_optimizer", "supports_sparse_gradients", "use_sparse_gradients"]


def supports_sparse_gradients(kind: OptimizerKind) -> bool:
    """Whether ``kind``'s torch optimizer takes sparse gradients with an unchanged update."""
    return kind in (OptimizerKind.ADAGRAD, OptimizerKind.SGD)


def use_sparse_gradients(module: nn.Module) -> int:
    """Switch every ``nn.EmbeddingBag`` / ``nn.Embedding`` under ``module`` to sparse
    gradients; returns how many were switched. Forward results are unchanged."""
    switched = 0
    for m in module.modules():
        if isinstance(m, (nn.EmbeddingBag, nn.Embedding)) and not m.sparse:
            m.sparse = True
            switched += 1
    return switched


def build_optimizer(kind: OptimizerKind, params: Iterable[torch.nn.Parameter] | Iterable[dict],
                    learning_rate: float) -> torch.optim.Optimizer:
    """A torch optimizer over ``params`` (parameters, or torch param-group dicts whose own
    ``lr`` overrides ``learning_rate``). Adagrad (the DLRM default for CTR models, robust to
    the skewed gradient frequencies of embedding rows), plain SGD, or Adam."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    if kind is OptimizerKind.ADAGRAD:
        return torch.optim.Adagrad(params, lr=learning_rate)
    if kind is OptimizerKind.SGD:
        return torch.optim.SGD(params, lr=learning_rate)
    if kind is OptimizerKind.ADAM:
        return torch.optim.Adam(params, lr=learning_rate)
    raise ValueError(f"unknown optimizer {kind!r}")
