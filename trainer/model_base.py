"""What every model kind shares (``trainer.model.DLRM``, ``trainer.dcn.DCNv2``,
``trainer.linear_model.LinearModel``): the MLP builder, the checked dense input and bottom
MLP, the first-order part, and the embedding collections a model declares.

A model is ``forward(dense [B, num_dense], sparse {feature: Jagged}) -> [B]`` logits. Its
logit is the kind's own part (``deep_logit``, none for the linear kind) plus, when the model
has one, the first-order part (``trainer.first_order.FirstOrder``). Its embedding collections
(``embedding_collections()``: ``embeddings``, the ``embedding_dim``-wide rows, and
``first_order.embeddings``, the 1-wide rows) are what the loop steps, prefetches, flushes and
checkpoints (``trainer.embedding.collections_of``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.batch import Jagged
from trainer.dense_norm import DenseNormalizer
from trainer.config import TrainSpec
from trainer.embedding import EmbeddingBagCollection, EmbeddingCollection, table_specs
from trainer.errors import TrainerError
from trainer.first_order import FirstOrder, first_order_like

__all__ = ["build_mlp", "build_logit_mlp", "glorot_", "CTRModel", "check_collection"]


def glorot_(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill a [fan_out, fan_in] weight in place with N(0, 2/(fan_in+fan_out)) draws from
    ``generator`` (Glorot normal, as the DLRM reference)."""
    fan_out, fan_in = weight.shape
    with torch.no_grad():
        weight.copy_(torch.randn(fan_out, fan_in, generator=generator) * math.sqrt(2.0 / (fan_in + fan_out)))
    return weight


def build_mlp(in_features: int, sizes: tuple[int, ...] | list[int], generator: torch.Generator,
              *, final_activation: bool) -> nn.Sequential:
    """Linear layers of the given output sizes with ReLU between them (and after the last one
    when ``final_activation``). Weights ~ N(0, 2/(fan_in+fan_out)) (Glorot normal, as the DLRM
    reference), biases ~ N(0, 1/fan_out), all drawn from ``generator`` in layer order, so the
    same generator state gives the same layers on every machine and device."""
    layers: list[nn.Module] = []
    fan_in = in_features
    for i, fan_out in enumerate(sizes):
        if fan_out < 1:
            raise TrainerError(f"MLP layer {i} must have >= 1 units, got {fan_out}")
        lin = nn.Linear(fan_in, fan_out)
        glorot_(lin.weight, generator)
        with torch.no_grad():
            lin.bias.copy_(torch.randn(fan_out, generator=generator) * math.sqrt(1.0 / fan_out))
        layers.append(lin)
        if i < len(sizes) - 1 or final_activation:
            layers.append(nn.ReLU())
        fan_in = fan_out
    return nn.Sequential(*layers)


def build_logit_mlp(in_features: int, sizes: tuple[int, ...], generator: torch.Generator) -> nn.Sequential:
    """``build_mlp`` of ``sizes`` plus a 1-unit logit layer whose bias starts at 0. A random
    N(0, 1) bias would start the model off by about one logit, which the first steps spend
    undoing while the first-order part learns the base rate; measured on bench/quality.py's
    shop_events stream it tripled the seed-to-seed spread of the progressive AUC."""
    mlp = build_mlp(in_features, tuple(sizes) + (1,), generator, final_activation=False)
    with torch.no_grad():
        mlp[-1].bias.zero_()
    return mlp


def check_collection(embeddings: nn.Module, dim: int, role: str, dim_name: str) -> None:
    """``embeddings`` implements the collection interface and has rows of ``dim`` (called
    ``dim_name`` in the error)."""
    if not isinstance(embeddings, EmbeddingCollection):
        raise TrainerError(
            f"{role} collection {type(embeddings).__name__} does not implement "
            "trainer.embedding.EmbeddingCollection (feature_names, dim, capabilities, forward)"
        )
    if int(embeddings.dim) != dim:
        raise TrainerError(f"{role} collection dim {embeddings.dim} != {dim_name} {dim}")


class CTRModel(nn.Module):
    """Base of the model kinds (see the module docstring). A subclass calls
    ``super().__init__(num_dense, normalize_dense)``, builds its layers, then ``set_collections(embeddings,
    first_order)`` last (so parameters keep the order of earlier releases: the optimizer's
    state in a checkpoint is stored by position), and implements ``deep_logit``.

    ``embeddings``: the ``embedding_dim``-wide collection (None: no sparse features, or the
    linear kind); ``first_order``: the first-order part (None: none)."""

    def __init__(self, num_dense: int, normalize_dense: bool = False):
        super().__init__()
        if num_dense < 0:
            raise TrainerError(f"num_dense must be >= 0, got {num_dense}")
        self.num_dense = num_dense
        # Dense features standardised online before any layer (trainer.dense_norm).
        self.dense_norm = DenseNormalizer(num_dense) if normalize_dense and num_dense else None
        self.embeddings: nn.Module | None = None
        self.first_order: FirstOrder | None = None
        self.feature_names: tuple[str, ...] = ()

    def set_collections(self, embeddings: nn.Module | None, first_order: FirstOrder | None) -> None:
        """Attach the embeddings and the first-order part (checked against each other)."""
        if first_order is not None and first_order.num_dense != self.num_dense:
            raise TrainerError(f"first-order part takes {first_order.num_dense} dense features, "
                               f"the model {self.num_dense}")
        names = tuple(embeddings.feature_names) if embeddings is not None else ()
        if (first_order is not None and embeddings is not None and first_order.embeddings is not None
                and tuple(first_order.feature_names) != names):
            raise TrainerError(f"first-order collection serves {list(first_order.feature_names)}, the "
                               f"embeddings {list(names)}: they must serve the same features")
        self.embeddings = embeddings
        self.first_order = first_order
        self.feature_names = names if embeddings is not None else (
            tuple(first_order.feature_names) if first_order is not None else ())

    # -- built from config -----------------------------------------------------------------

    @classmethod
    def collections_from_config(cls, cfg: TrainSpec, embeddings: nn.Module | None,
                                first_order: nn.Module | None) -> tuple[nn.Module | None, FirstOrder | None]:
        """The model's (embeddings, first-order part) for ``cfg``: the given collections
        (checked against the schema), or by default plain ``EmbeddingBagCollection``s, and a
        first-order collection built like a given fused one (``first_order_like``)."""
        sparse_names = tuple(s.name for s in cfg.schema.sparse)
        if cfg.model.has_embeddings:
            if embeddings is None and sparse_names:
                embeddings = EmbeddingBagCollection(table_specs(cfg.schema, cfg.trainer.embedding_dim),
                                                    seed=cfg.trainer.seed)
            _check_features(embeddings, sparse_names, "embedding")
        elif embeddings is not None:
            raise TrainerError(f"[model] kind = {cfg.model.kind.value!r} has no embedding_dim-wide "
                               "embeddings; pass the 1-wide collection as first_order=")
        if not cfg.model.has_first_order:
            if first_order is not None:
                raise TrainerError("first_order= given, but [model] wide = false")
            return embeddings, None
        if first_order is None and sparse_names:
            first_order = first_order_like(embeddings, cfg)
        _check_features(first_order, sparse_names, "first-order")
        if first_order is not None:
            check_collection(first_order, 1, "first-order", "the first-order rows' width")
        return embeddings, FirstOrder(len(cfg.schema.dense), first_order)

    # -- the forward pass ------------------------------------------------------------------

    def embedding_collections(self) -> dict[str, nn.Module]:
        """Attribute path -> collection, for every embedding collection of this model."""
        out: dict[str, nn.Module] = {}
        if self.embeddings is not None:
            out["embeddings"] = self.embeddings
        if self.first_order is not None and self.first_order.embeddings is not None:
            out["first_order.embeddings"] = self.first_order.embeddings
        return out

    def check_dense(self, dense: torch.Tensor) -> None:
        if self.num_dense and (dense.dim() != 2 or dense.shape[1] != self.num_dense):
            raise TrainerError(f"dense input must be [B, {self.num_dense}], got {list(dense.shape)}")

    def deep_logit(self, dense: torch.Tensor, sparse: dict[str, Jagged]) -> torch.Tensor | None:
        """The kind's own logit [B] (None: the model is its first-order part alone)."""
        raise NotImplementedError

    def forward(self, dense: torch.Tensor, sparse: dict[str, Jagged]) -> torch.Tensor:
        self.check_dense(dense)
        if self.dense_norm is not None:
            dense = self.dense_norm(dense)
        logit = self.deep_logit(dense, sparse)
        if self.first_order is None:
            return logit
        linear = self.first_order(dense, sparse)
        return linear if logit is None else logit + linear


def _check_features(collection: nn.Module | None, names: tuple[str, ...], role: str) -> None:
    if collection is not None and tuple(collection.feature_names) != names:
        raise TrainerError(
            f"{role} collection serves features {list(collection.feature_names)} but "
            f"schema.sparse declares {list(names)} (order matters)"
        )
