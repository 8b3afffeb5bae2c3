"""The ``linear`` model kind: the first-order part alone (``trainer.first_order``), i.e.
online logistic regression on hashed one-hot features with per-coordinate Adagrad (row-wise
Adagrad on 1-wide rows, accumulating per-lookup squared gradients by default), plus a linear
term on the dense features. The baseline users
already run (Vowpal Wabbit and the like), trained, placed and checkpointed like every other
kind, so the two compare in one tool.

Example:
    >>> from transforms.config import SchemaConfig, SparseFeature
    >>> from trainer.config import ModelConfig, ModelKind, TrainSpec
    >>> spec = TrainSpec(SchemaConfig(sparse=(SparseFeature("u", rows=10),)), model=ModelConfig(kind=ModelKind.LINEAR))
    >>> sorted(LinearModel.from_config(spec).embedding_collections())
    ['first_order.embeddings']
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.batch import Jagged
from trainer.config import TrainSpec
from trainer.first_order import FirstOrder
from trainer.model_base import CTRModel

__all__ = ["LinearModel"]


class LinearModel(CTRModel):
    """``forward(dense, sparse) -> [B]``: the first-order logit."""

    def __init__(self, first_order: FirstOrder, normalize_dense: bool = False):
        super().__init__(first_order.num_dense, normalize_dense)
        self.set_collections(None, first_order)

    @classmethod
    def from_config(cls, cfg: TrainSpec, embeddings: nn.Module | None = None,
                    first_order: nn.Module | None = None) -> "LinearModel":
        """Build from ``cfg``; ``first_order`` is the 1-wide collection (default: plain
        ``EmbeddingBagCollection`` rows); ``embeddings`` must be None."""
        _, part = cls.collections_from_config(cfg, embeddings, first_order)
        return cls(part, cfg.model.normalize_dense)

    def deep_logit(self, dense: torch.Tensor, sparse: dict[str, Jagged]) -> None:
        return None
