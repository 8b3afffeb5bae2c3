"""Row-wise embedding optimizers: the update the row cache applies to cached rows, and the
same update for plain ``nn.EmbeddingBag`` tables so cached and uncached training agree.

Row-wise Adagrad (as in FBGEMM's ``EXACT_ROWWISE_ADAGRAD``) keeps ONE accumulator per row,
the running sum of the mean squared gradient over the row's columns:
``state += mean(g**2)``; ``w -= lr * g / (sqrt(state) + eps)``. SGD keeps no state.
A row with a zero gradient is left exactly unchanged by both, so applying the update to the
rows a batch touched is the same as applying it to the whole table.

Example:
    >>> import torch
    >>> w, s = torch.ones(1, 2), torch.zeros(1, 1)
    >>> apply_row_update_(RowOptimizerKind.SGD, w, s, torch.ones(1, 2), lr=0.5, eps=1e-8)
    >>> w.tolist()
    [[0.5, 0.5]]
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import RowOptimizerKind

__all__ = ["RowOptimizerKind", "state_dim_of", "apply_row_update_", "RowWiseOptimizer"]


def state_dim_of(kind: RowOptimizerKind) -> int:
    """Optimizer-state floats stored beside each row."""
    return 1 if kind is RowOptimizerKind.ROWWISE_ADAGRAD else 0


@torch.no_grad()
def apply_row_update_(kind: RowOptimizerKind, weights: torch.Tensor, state: torch.Tensor,
                      grad: torch.Tensor, lr: float, eps: float) -> None:
    """Update ``weights [n, D]`` and ``state [n, state_dim]`` in place from ``grad [n, D]``
    (one gradient per distinct row: callers sum duplicate rows first)."""
    if kind is RowOptimizerKind.SGD:
        weights.sub_(grad, alpha=lr)
    elif kind is RowOptimizerKind.ROWWISE_ADAGRAD:
        state[:, 0].add_(grad.pow(2).mean(dim=1))
        weights.sub_(lr * grad / (state[:, :1].sqrt() + eps))
    else:
        raise ValueError(f"unknown row optimizer {kind!r}")


class RowWiseOptimizer:
    """The row-wise update for the weights of plain ``nn.EmbeddingBag`` tables (dense or
    sparse gradients), with the state held here. ``step()`` touches only rows with a
    gradient entry; ``zero_grad()`` clears the bags' gradients.

    Example:
        >>> bag = nn.EmbeddingBag(4, 2, mode="sum", sparse=True)
        >>> opt = RowWiseOptimizer([bag], RowOptimizerKind.ROWWISE_ADAGRAD, lr=0.1)
        >>> bag(torch.tensor([1, 1]), torch.tensor([0])).sum().backward(); opt.step()
        >>> float(opt.state[0][1, 0])
        4.0
    """

    def __init__(self, bags: list[nn.EmbeddingBag], kind: RowOptimizerKind, lr: float,
                 eps: float = 1e-8):
        self.bags = list(bags)
        self.kind, self.lr, self.eps = kind, lr, eps
        self.state = [torch.zeros(b.weight.shape[0], state_dim_of(kind), device=b.weight.device)
                      for b in self.bags]

    @torch.no_grad()
    def step(self) -> None:
        for bag, state in zip(self.bags, self.state):
            grad = bag.weight.grad
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.coalesce()  # sums the entries of repeated rows
                rows, values = grad.indices()[0], grad.values()
            else:
                rows = grad.abs().sum(dim=1).nonzero().squeeze(1)
                values = grad.index_select(0, rows)
            # index_select/index_copy_: advanced indexing is far slower on CPU
            w, s = bag.weight.index_select(0, rows), state.index_select(0, rows)
            apply_row_update_(self.kind, w, s, values, self.lr, self.eps)
            bag.weight.index_copy_(0, rows, w)
            state.index_copy_(0, rows, s)

    def zero_grad(self) -> None:
        for bag in self.bags:
            bag.weight.grad = None

    def state_dict(self) -> dict:
        return {"kind": self.kind.value, "state": [s.clone() for s in self.state]}

    def load_state_dict(self, sd: dict) -> None:
        if sd["kind"] != self.kind.value or len(sd["state"]) != len(self.state):
            raise ValueError(f"row optimizer state is for {sd['kind']!r} over {len(sd['state'])} "
                             f"tables, this one is {self.kind.value!r} over {len(self.state)}")
        for mine, saved in zip(self.state, sd["state"]):
            mine.copy_(saved)
