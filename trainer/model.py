"""DLRM: bottom MLP over dense features, pooled embeddings, pairwise dot interaction, top MLP.

The model is ``logit = top([d, triu(T T^T)])`` where ``d = bottom(dense)`` is ``[B, D]``,
``T = [d, e_1 .. e_F]`` stacks the dense vector and the F pooled embeddings (``[B, F+1, D]``)
and ``triu`` keeps the strictly upper triangle (i < j, no diagonal), so the top MLP sees
``D + (F+1)F/2`` inputs. Without dense features the dense vector is left out of ``T`` and of
the concatenation; without sparse features the interaction is empty and ``top(d)`` remains.

The embedding collection is the submodule ``embeddings``; anything implementing the
``trainer.embedding`` interface (``forward({feature: Jagged}) -> [B, F, D]``,
``feature_names``, ``dim``) can be passed in, which is how sharded and SSD-cached
collections replace the plain one.

Example:
    >>> from transforms.config import DenseFeature, SchemaConfig, SparseFeature
    >>> spec = TrainSpec(SchemaConfig(dense=(DenseFeature("x"),), sparse=(SparseFeature("u", rows=10),)))
    >>> model = DLRM.from_config(spec)
    >>> model.embeddings.feature_names
    ('u',)
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
from torch import nn

from trainer.batch import Jagged
from trainer.config import EmbeddingDtype, TrainSpec
from trainer.embedding import EmbeddingBagCollection, EmbeddingCollection, TableSpec, table_specs
from trainer.errors import TrainerError
from trainer.fused_embedding import FusedEmbeddingBagCollection

__all__ = [
    "DLRM", "build_mlp", "tables_from_config", "fused_embeddings_from_config", "model_shape",
    "model_fingerprint", "EMBEDDING_TORCH_DTYPES",
]

#: ``[trainer] embedding_dtype`` -> the torch dtype of the rows.
EMBEDDING_TORCH_DTYPES = {
    EmbeddingDtype.FP32: torch.float32, EmbeddingDtype.FP16: torch.float16, EmbeddingDtype.BF16: torch.bfloat16,
}


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
        with torch.no_grad():
            lin.weight.copy_(torch.randn(fan_out, fan_in, generator=generator)
                             * math.sqrt(2.0 / (fan_in + fan_out)))
            lin.bias.copy_(torch.randn(fan_out, generator=generator) * math.sqrt(1.0 / fan_out))
        layers.append(lin)
        if i < len(sizes) - 1 or final_activation:
            layers.append(nn.ReLU())
        fan_in = fan_out
    return nn.Sequential(*layers)


def tables_from_config(cfg: TrainSpec) -> list[TableSpec]:
    """One ``TableSpec`` per sparse feature, in schema order (dim 0 = trainer.embedding_dim)."""
    return table_specs(cfg.schema, cfg.trainer.embedding_dim)


def fused_embeddings_from_config(cfg: TrainSpec, device: torch.device | str | None = None
                                 ) -> FusedEmbeddingBagCollection:
    """Every sparse feature's table in one ``FusedEmbeddingBagCollection`` on ``device``,
    trained by ``[trainer] sparse_optimizer`` at ``sparse_learning_rate``, rows stored as
    ``embedding_dtype``: the plain (single-process, in-memory) placement."""
    t = cfg.trainer
    return FusedEmbeddingBagCollection(
        tables_from_config(cfg), seed=t.seed, optimizer=t.sparse_optimizer_kind.value,
        learning_rate=t.sparse_lr, embedding_dtype=EMBEDDING_TORCH_DTYPES[t.embedding_dtype],
        device=device)


def model_shape(cfg: TrainSpec) -> dict[str, Any]:
    """The config fields that decide parameter shapes (and so whether a checkpoint fits)."""
    t = cfg.trainer
    return {
        "dense": [d.name for d in cfg.schema.dense],
        "sparse": [[s.name, s.rows, s.dim] for s in tables_from_config(cfg)],
        "embedding_dim": t.embedding_dim,
        "bottom_mlp": list(t.bottom_mlp),
        "top_mlp": list(t.top_mlp),
    }


def model_fingerprint(cfg: TrainSpec) -> str:
    """A short stable hash of ``model_shape(cfg)``."""
    blob = json.dumps(model_shape(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class DLRM(nn.Module):
    """The DLRM CTR model. ``forward(dense [B, num_dense], sparse {feature: Jagged}) -> [B]``
    logits (apply ``sigmoid`` for click probabilities).

    Initialisation is deterministic: the bottom then top MLP are drawn from a generator seeded
    with ``seed``; the default embedding collection seeds its rows with ``seed`` too.
    """

    def __init__(self, num_dense: int, embeddings: nn.Module | None, *, embedding_dim: int,
                 bottom_mlp: tuple[int, ...] = (), top_mlp: tuple[int, ...] = (), seed: int = 0):
        super().__init__()
        if num_dense < 0:
            raise TrainerError(f"num_dense must be >= 0, got {num_dense}")
        if num_dense == 0 and embeddings is None:
            raise TrainerError("DLRM needs dense features, sparse features or both")
        if embeddings is not None:
            if not isinstance(embeddings, EmbeddingCollection):
                raise TrainerError(
                    f"embedding collection {type(embeddings).__name__} does not implement "
                    "trainer.embedding.EmbeddingCollection (feature_names, dim, capabilities, forward)"
                )
            if int(embeddings.dim) != embedding_dim:
                raise TrainerError(
                    f"embedding collection dim {embeddings.dim} != trainer.embedding_dim "
                    f"{embedding_dim}; the dot interaction needs one dim"
                )
        self.num_dense = num_dense
        self.embedding_dim = embedding_dim
        self.feature_names: tuple[str, ...] = (
            tuple(embeddings.feature_names) if embeddings is not None else ()
        )
        num_sparse = len(self.feature_names)
        g = torch.Generator().manual_seed(int(seed))

        if num_dense:
            if bottom_mlp and bottom_mlp[-1] != embedding_dim and num_sparse:
                raise TrainerError(
                    f"bottom_mlp must end in embedding_dim {embedding_dim}, got {list(bottom_mlp)}"
                )
            if not bottom_mlp and num_sparse and num_dense != embedding_dim:
                raise TrainerError(
                    f"with an empty bottom_mlp the {num_dense} dense features are the dense "
                    f"vector and must number embedding_dim ({embedding_dim}); add a bottom_mlp "
                    f"ending in {embedding_dim}"
                )
            # ReLU after the last bottom layer, as in the reference DLRM (the dense vector is
            # a non-negative feature vector like the others in the interaction).
            self.bottom = build_mlp(num_dense, bottom_mlp, g, final_activation=True)
            dense_out = bottom_mlp[-1] if bottom_mlp else num_dense
        else:
            self.bottom = nn.Sequential()
            dense_out = 0

        vectors = num_sparse + (1 if num_dense else 0)
        if num_sparse:
            iu = torch.triu_indices(vectors, vectors, offset=1)
            # One flat index into the [V*V] Gram matrix: a single index_select (and an
            # index_add in backward) instead of advanced indexing z[:, i, j], whose backward
            # is several times slower on GPUs (issue 9's profile: ~5.5 ms/step at B=65536).
            self.register_buffer("_triu_flat", (iu[0] * vectors + iu[1]).clone(), persistent=False)
            num_pairs = vectors * (vectors - 1) // 2
        else:
            num_pairs = 0
        top_in = dense_out + num_pairs
        if top_in == 0:
            # One sparse feature and no dense: no pair exists; feed the pooled vector itself.
            top_in = embedding_dim
        self._top_in = top_in
        self.top = build_mlp(top_in, tuple(top_mlp) + (1,), g, final_activation=False)
        self.embeddings = embeddings if embeddings is not None else None

    @classmethod
    def from_config(cls, cfg: TrainSpec, embeddings: nn.Module | None = None) -> "DLRM":
        """Build from ``cfg.schema`` and ``cfg.trainer``. ``embeddings`` defaults to an
        ``EmbeddingBagCollection`` over one table per sparse feature; a given collection must
        serve exactly the schema's sparse features in schema order."""
        sparse_names = tuple(s.name for s in cfg.schema.sparse)
        if embeddings is None and sparse_names:
            embeddings = EmbeddingBagCollection(tables_from_config(cfg), seed=cfg.trainer.seed)
        if embeddings is not None and tuple(embeddings.feature_names) != sparse_names:
            raise TrainerError(
                f"embedding collection serves features {list(embeddings.feature_names)} but "
                f"schema.sparse declares {list(sparse_names)} (order matters)"
            )
        t = cfg.trainer
        return cls(len(cfg.schema.dense), embeddings, embedding_dim=t.embedding_dim,
                   bottom_mlp=t.bottom_mlp, top_mlp=t.top_mlp, seed=t.seed)

    def interact(self, dense_vec: torch.Tensor | None, pooled: torch.Tensor | None) -> torch.Tensor:
        """The top MLP's input: ``[d, triu(T T^T)]`` (see the module docstring)."""
        if pooled is None:
            return dense_vec
        t = pooled if dense_vec is None else torch.cat([dense_vec.unsqueeze(1), pooled], dim=1)
        if t.shape[1] < 2:
            return t[:, 0, :]
        z = torch.bmm(t, t.transpose(1, 2))
        pairs = z.flatten(1).index_select(1, self._triu_flat)
        return pairs if dense_vec is None else torch.cat([dense_vec, pairs], dim=1)

    def forward(self, dense: torch.Tensor, sparse: dict[str, Jagged]) -> torch.Tensor:
        if self.num_dense:
            if dense.dim() != 2 or dense.shape[1] != self.num_dense:
                raise TrainerError(
                    f"dense input must be [B, {self.num_dense}], got {list(dense.shape)}"
                )
            dense_vec = self.bottom(dense)
        else:
            dense_vec = None
        pooled = self.embeddings(sparse) if self.embeddings is not None else None
        return self.top(self.interact(dense_vec, pooled)).squeeze(1)
