"""DCN-V2 (Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for
Web-scale Learning to Rank Systems", 2021): a cross network of explicit feature crosses beside
or before a deep MLP, the strong industrial baseline next to DLRM.

``x0 = [bottom(dense), e_1, .., e_F]`` concatenates the bottom MLP's output and the F pooled
embeddings (``[B, d]``, ``d = D_bottom + F * D``). Each cross layer computes

    x_{l+1} = x0 * (W_l x_l + b_l) + x_l                      (``[model] cross_rank = 0``)
    x_{l+1} = x0 * (U_l (V_l^T x_l) + b_l) + x_l              (low rank r = ``cross_rank``)

(``*`` element-wise). ``[model] cross_structure``: ``stacked`` feeds the cross network's
output to the deep MLP (``[trainer] top_mlp``), then a 1-unit head; ``parallel`` runs both on
``x0`` and the head reads their concatenation. The first-order part is added to the head's
logit when ``[model] wide`` (``trainer.model_base``).

Initialisation is deterministic from ``[trainer] seed``: bottom MLP, cross layers (Glorot
normal weights, zero biases, so each layer starts near ``x0 * W x + x``), deep MLP, head.

Example:
    >>> from transforms.config import DenseFeature, SchemaConfig, SparseFeature
    >>> from trainer.config import ModelConfig, ModelKind, TrainerConfig, TrainSpec
    >>> spec = TrainSpec(SchemaConfig(dense=(DenseFeature("x"),), sparse=(SparseFeature("u", rows=10),)),
    ...                  TrainerConfig(embedding_dim=4, bottom_mlp=(4,), top_mlp=(8,)),
    ...                  model=ModelConfig(kind=ModelKind.DCN_V2, cross_layers=2))
    >>> DCNv2.from_config(spec).cross.width
    8
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.batch import Jagged
from trainer.config import CrossStructure, TrainSpec
from trainer.errors import TrainerError
from trainer.first_order import FirstOrder
from trainer.model import dense_bottom
from trainer.model_base import CTRModel, build_logit_mlp, build_mlp, check_collection, glorot_

__all__ = ["DCNv2", "CrossNetwork"]


class CrossNetwork(nn.Module):
    """``layers`` cross layers over vectors of ``width`` (see the module docstring);
    ``rank`` 0 = full-rank ``W_l``, else ``U_l V_l^T`` of inner size ``rank``."""

    def __init__(self, width: int, layers: int, rank: int, generator: torch.Generator):
        super().__init__()
        if width < 1 or layers < 1 or rank < 0:
            raise TrainerError(f"cross network needs width >= 1, layers >= 1, rank >= 0; got "
                               f"{width}, {layers}, {rank}")
        self.width = width
        self.layers = nn.ModuleList()
        for _ in range(layers):
            if rank and rank < width:
                down, up = nn.Linear(width, rank, bias=False), nn.Linear(rank, width)
                glorot_(down.weight, generator)
                glorot_(up.weight, generator)
                layer = nn.Sequential(down, up)
                bias = up.bias
            else:
                layer = nn.Linear(width, width)
                glorot_(layer.weight, generator)
                bias = layer.bias
            with torch.no_grad():
                bias.zero_()
            self.layers.append(layer)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DCNv2(CTRModel):
    """DCN-V2 CTR model: ``forward(dense [B, num_dense], sparse) -> [B]`` logits."""

    def __init__(self, num_dense: int, embeddings: nn.Module | None, *, embedding_dim: int,
                 bottom_mlp: tuple[int, ...] = (), deep_mlp: tuple[int, ...] = (),
                 cross_layers: int = 3, cross_rank: int = 0,
                 structure: CrossStructure = CrossStructure.STACKED, seed: int = 0,
                 first_order: FirstOrder | None = None, normalize_dense: bool = False):
        if num_dense == 0 and embeddings is None:
            raise TrainerError("DCN-V2 needs dense features, sparse features or both")
        if embeddings is not None:
            check_collection(embeddings, embedding_dim, "embedding", "trainer.embedding_dim")
        super().__init__(num_dense, normalize_dense)
        num_sparse = len(embeddings.feature_names) if embeddings is not None else 0
        g = torch.Generator().manual_seed(int(seed))
        self.bottom, dense_out = dense_bottom(num_dense, tuple(bottom_mlp), g)
        width = dense_out + num_sparse * embedding_dim
        self.structure = CrossStructure(structure)
        self.cross = CrossNetwork(width, cross_layers, cross_rank, g)
        self.deep = build_mlp(width, tuple(deep_mlp), g, final_activation=True)
        deep_out = deep_mlp[-1] if deep_mlp else width
        head_in = deep_out if self.structure is CrossStructure.STACKED else width + deep_out
        self.head = build_logit_mlp(head_in, (), g)
        self.set_collections(embeddings, first_order)

    @classmethod
    def from_config(cls, cfg: TrainSpec, embeddings: nn.Module | None = None,
                    first_order: nn.Module | None = None) -> "DCNv2":
        """Build from ``cfg``: ``[trainer] bottom_mlp`` over the dense features, ``top_mlp``
        as the deep MLP, ``[model] cross_layers`` / ``cross_rank`` / ``cross_structure``;
        collections as ``trainer.model.DLRM.from_config``."""
        embeddings, part = cls.collections_from_config(cfg, embeddings, first_order)
        t, m = cfg.trainer, cfg.model
        return cls(len(cfg.schema.dense), embeddings, embedding_dim=t.embedding_dim,
                   bottom_mlp=t.bottom_mlp, deep_mlp=t.top_mlp, cross_layers=m.cross_layers,
                   cross_rank=m.cross_rank, structure=m.cross_structure, seed=t.seed, first_order=part,
                   normalize_dense=m.normalize_dense)

    def deep_logit(self, dense: torch.Tensor, sparse: dict[str, Jagged]) -> torch.Tensor:
        parts = []
        if self.num_dense:
            parts.append(self.bottom(dense))
        if self.embeddings is not None:
            parts.append(self.embeddings(sparse).flatten(1))
        x0 = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        crossed = self.cross(x0)
        if self.structure is CrossStructure.STACKED:
            return self.head(self.deep(crossed)).squeeze(1)
        return self.head(torch.cat([crossed, self.deep(x0)], dim=1)).squeeze(1)
