"""DLRM: bottom MLP over dense features, pooled embeddings, pairwise dot interaction, top MLP;
the model kinds (``build_model``) and the factories and shape records every kind shares.

The model is ``logit = top([d, triu(T T^T), e_1 .. e_F])`` where ``d = bottom(dense)`` is
``[B, D]``, ``T = [d, e_1 .. e_F]`` stacks the dense vector and the F pooled embeddings
(``[B, F+1, D]``) and ``triu`` keeps the strictly upper triangle (i < j, no diagonal), so the
top MLP sees ``D + (F+1)F/2 + F D`` inputs. The pooled embeddings themselves are part of the
input with ``[model] interaction = "dot_concat"`` (the default); ``"dot"`` leaves them out,
as the reference DLRM does (``D + (F+1)F/2`` inputs). The dots are bilinear in the rows, so
their gradient to a row is the other (small, freshly initialised) rows: through the dots
alone the embeddings learn slowly early in a stream, and the concatenated path, linear in
them, is what a fresh model learns from first (README "Tuning"). Without dense features the
dense vector is left out of ``T`` and of the concatenation; without sparse features the
interaction is empty and ``top(d)`` remains.
With ``[model] wide = true`` (the default) the first-order part
(``trainer.first_order.FirstOrder``) is added to that logit.

The embedding collection is the submodule ``embeddings``; anything implementing the
``trainer.embedding`` interface (``forward({feature: Jagged}) -> [B, F, D]``,
``feature_names``, ``dim``) can be passed in, which is how sharded and SSD-cached
collections replace the plain one. The first-order rows are another collection
(``first_order.embeddings``), passed as ``first_order=`` (see ``trainer.model_base``).

Model kinds (``[model] kind``): ``dlrm`` (this module), ``dcn_v2`` (``trainer.dcn``),
``linear`` (``trainer.linear_model``); every kind has ``from_config(cfg, embeddings=None,
first_order=None)`` and ``forward(dense, sparse) -> [B]`` logits.

Example:
    >>> from transforms.config import DenseFeature, SchemaConfig, SparseFeature
    >>> spec = TrainSpec(SchemaConfig(dense=(DenseFeature("x"),), sparse=(SparseFeature("u", rows=10),)))
    >>> model = DLRM.from_config(spec)
    >>> model.embeddings.feature_names, sorted(model.embedding_collections())
    (('u',), ['embeddings', 'first_order.embeddings'])
"""

from __future__ import annotations

import enum
import hashlib
import json
from typing import Any

import torch
from torch import nn

from trainer.batch import Jagged
from trainer.config import EmbeddingDtype, Interaction, ModelConfig, ModelKind, TrainerConfig, TrainSpec
from trainer.embedding import TableSpec, table_specs
from trainer.errors import TrainerError
from trainer.first_order import FirstOrder, first_order_tables
from trainer.fused_embedding import FusedEmbeddingBagCollection
from trainer.model_base import CTRModel, build_logit_mlp, build_mlp, check_collection
from trainer.sparse_optim import SparseOptimizerSpec

__all__ = [
    "DLRM", "build_mlp", "build_model", "tables_from_config", "fused_embeddings_from_config",
    "model_shape", "model_fingerprint", "EMBEDDING_TORCH_DTYPES", "PRE_MODEL_KIND_SHAPE",
    "saved_shape_defaults", "CHANGED_DEFAULTS", "changed_default_hints",
]

#: ``[trainer] embedding_dtype`` -> the torch dtype of the rows.
EMBEDDING_TORCH_DTYPES = {
    EmbeddingDtype.FP32: torch.float32, EmbeddingDtype.FP16: torch.float16, EmbeddingDtype.BF16: torch.bfloat16,
}

#: What a ``model_shape`` recorded before [model] existed meant: a DLRM without first-order part.
PRE_MODEL_KIND_SHAPE = {"kind": ModelKind.DLRM.value, "wide": False, "normalize_dense": False}
#: What a DLRM's ``model_shape`` recorded before [model] interaction existed meant.
PRE_INTERACTION = Interaction.DOT.value
#: Shape settings whose default a release changed: ``model_shape`` key -> (config section, the
#: old default as ``model_shape`` records it). A checkpoint trained under the old default does
#: not fit the new one; the resume error names the setting that brings it back.
CHANGED_DEFAULTS: dict[str, tuple[str, Any]] = {
    "interaction": ("model", PRE_INTERACTION),
    "top_mlp": ("trainer", [64, 32]),
}


def saved_shape_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A ``model_shape`` read from a checkpoint with the keys it predates filled in as what
    they meant then (``PRE_MODEL_KIND_SHAPE``, ``PRE_INTERACTION``)."""
    shape = {**PRE_MODEL_KIND_SHAPE, **saved}
    if shape["kind"] == ModelKind.DLRM.value and "embedding_dim" in shape:
        shape.setdefault("interaction", PRE_INTERACTION)
    return shape


def changed_default_hints(saved: dict[str, Any], shape: dict[str, Any]) -> dict[str, str]:
    """``{key: "[section] key = old"}`` for each setting of ``CHANGED_DEFAULTS`` where
    ``saved`` (a checkpoint's shape) has the old default and ``shape`` (the config's) today's."""
    defaults = {"model": ModelConfig(), "trainer": TrainerConfig()}
    hints = {}
    for key, (section, old) in CHANGED_DEFAULTS.items():
        now = getattr(defaults[section], key)
        now = now.value if isinstance(now, enum.Enum) else list(now) if isinstance(now, tuple) else now
        if saved.get(key) == old and shape.get(key) == now:
            hints[key] = f"[{section}] {key} = {json.dumps(old)}"
    return hints


def tables_from_config(cfg: TrainSpec) -> list[TableSpec]:
    """One ``TableSpec`` per sparse feature, in schema order (dim 0 = trainer.embedding_dim)."""
    return table_specs(cfg.schema, cfg.trainer.embedding_dim)


def fused_embeddings_from_config(cfg: TrainSpec, device: torch.device | str | None = None,
                                 tables: list[TableSpec] | None = None) -> FusedEmbeddingBagCollection:
    """Every sparse feature's table (or ``tables``, e.g. the first-order ones of
    ``trainer.first_order.first_order_tables``) in one ``FusedEmbeddingBagCollection`` on
    ``device``, trained by ``[trainer] sparse_optimizer`` at ``sparse_learning_rate``, rows
    stored as ``embedding_dtype``: the plain (single-process, in-memory) placement."""
    t = cfg.trainer
    return FusedEmbeddingBagCollection(
        tables_from_config(cfg) if tables is None else tables, seed=t.seed,
        optimizer=SparseOptimizerSpec(t.sparse_optimizer_kind, t.sparse_lr, accumulator=t.sparse_accumulator),
        embedding_dtype=EMBEDDING_TORCH_DTYPES[t.embedding_dtype], device=device)


def model_shape(cfg: TrainSpec) -> dict[str, Any]:
    """The config fields that decide parameter shapes (and so whether a checkpoint fits)."""
    t, m = cfg.trainer, cfg.model
    shape: dict[str, Any] = {
        "kind": m.kind.value,
        "wide": m.has_first_order,
        "normalize_dense": m.normalize_dense,
        "dense": [d.name for d in cfg.schema.dense],
    }
    if not m.has_embeddings:
        shape["sparse"] = [[s.name, s.rows, s.dim] for s in first_order_tables(cfg)]
        return shape
    shape.update({
        "sparse": [[s.name, s.rows, s.dim] for s in tables_from_config(cfg)],
        "embedding_dim": t.embedding_dim,
        "bottom_mlp": list(t.bottom_mlp),
        "top_mlp": list(t.top_mlp),
    })
    if m.kind is ModelKind.DLRM:
        shape["interaction"] = m.interaction.value
    if m.kind is ModelKind.DCN_V2:
        shape.update({"cross_layers": m.cross_layers, "cross_rank": m.cross_rank,
                      "cross_structure": m.cross_structure.value})
    return shape


def model_fingerprint(cfg: TrainSpec) -> str:
    """A short stable hash of ``model_shape(cfg)``."""
    blob = json.dumps(model_shape(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_model(cfg: TrainSpec, embeddings: nn.Module | None = None,
                first_order: nn.Module | None = None) -> CTRModel:
    """The model ``[model] kind`` names, built by its ``from_config``."""
    from trainer.dcn import DCNv2
    from trainer.linear_model import LinearModel

    kinds: dict[ModelKind, type[CTRModel]] = {ModelKind.DLRM: DLRM, ModelKind.DCN_V2: DCNv2,
                                              ModelKind.LINEAR: LinearModel}
    return kinds[cfg.model.kind].from_config(cfg, embeddings, first_order)


def dense_bottom(num_dense: int, bottom_mlp: tuple[int, ...], generator: torch.Generator) -> tuple[nn.Module, int]:
    """The bottom MLP over the dense features (ReLU after its last layer too, as in the
    reference DLRM: the dense vector is a non-negative feature vector like the others) and
    its output width; an empty ``bottom_mlp`` passes the features through."""
    if not num_dense:
        return nn.Sequential(), 0
    return build_mlp(num_dense, bottom_mlp, generator, final_activation=True), \
        (bottom_mlp[-1] if bottom_mlp else num_dense)


class DLRM(CTRModel):
    """The DLRM CTR model. ``forward(dense [B, num_dense], sparse {feature: Jagged}) -> [B]``
    logits (apply ``sigmoid`` for click probabilities).

    Initialisation is deterministic: the bottom then top MLP are drawn from a generator seeded
    with ``seed``; the default embedding collection seeds its rows with ``seed`` too.
    ``first_order``: the first-order part added to the logit (None: none);
    ``normalize_dense``: standardise the dense features online (``trainer.dense_norm``);
    ``interaction``: whether the top MLP also reads the pooled embeddings (module docstring).
    """

    def __init__(self, num_dense: int, embeddings: nn.Module | None, *, embedding_dim: int,
                 bottom_mlp: tuple[int, ...] = (), top_mlp: tuple[int, ...] = (), seed: int = 0,
                 first_order: FirstOrder | None = None, normalize_dense: bool = False,
                 interaction: Interaction = Interaction.DOT_CONCAT):
        if num_dense == 0 and embeddings is None:
            raise TrainerError("DLRM needs dense features, sparse features or both")
        if embeddings is not None:
            check_collection(embeddings, embedding_dim, "embedding",
                             "trainer.embedding_dim (the dot interaction needs one dim)")
        super().__init__(num_dense, normalize_dense)
        self.embedding_dim = embedding_dim
        num_sparse = len(embeddings.feature_names) if embeddings is not None else 0
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
        self.bottom, dense_out = dense_bottom(num_dense, tuple(bottom_mlp), g)

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
        # With one vector there is no pair: the pooled vector itself is the input (below).
        self.concat = Interaction(interaction) is Interaction.DOT_CONCAT and num_sparse > 0 and vectors >= 2
        top_in = dense_out + num_pairs + (num_sparse * embedding_dim if self.concat else 0)
        if top_in == 0:
            # One sparse feature and no dense: no pair exists; feed the pooled vector itself.
            top_in = embedding_dim
        self._top_in = top_in
        self.top = build_logit_mlp(top_in, tuple(top_mlp), g)
        self.set_collections(embeddings, first_order)

    @classmethod
    def from_config(cls, cfg: TrainSpec, embeddings: nn.Module | None = None,
                    first_order: nn.Module | None = None) -> "DLRM":
        """Build from ``cfg.schema``, ``cfg.trainer`` and ``cfg.model``. ``embeddings``
        defaults to an ``EmbeddingBagCollection`` over one table per sparse feature; a given
        collection must serve exactly the schema's sparse features in schema order.
        ``first_order`` (with ``[model] wide``): the 1-wide collection, by default built like
        ``embeddings`` (``trainer.first_order.first_order_like``)."""
        embeddings, part = cls.collections_from_config(cfg, embeddings, first_order)
        t = cfg.trainer
        return cls(len(cfg.schema.dense), embeddings, embedding_dim=t.embedding_dim,
                   bottom_mlp=t.bottom_mlp, top_mlp=t.top_mlp, seed=t.seed, first_order=part,
                   normalize_dense=cfg.model.normalize_dense, interaction=cfg.model.interaction)

    def interact(self, dense_vec: torch.Tensor | None, pooled: torch.Tensor | None) -> torch.Tensor:
        """The top MLP's input: ``[d, triu(T T^T)]`` (see the module docstring)."""
        if pooled is None:
            return dense_vec
        t = pooled if dense_vec is None else torch.cat([dense_vec.unsqueeze(1), pooled], dim=1)
        if t.shape[1] < 2:
            return t[:, 0, :]
        z = torch.bmm(t, t.transpose(1, 2))
        pairs = z.flatten(1).index_select(1, self._triu_flat)
        parts = [pairs] if dense_vec is None else [dense_vec, pairs]
        if self.concat:
            # In the pairs' dtype (bf16 under autocast, as the top MLP reads them anyway): an
            # fp32 block would make the whole concatenation fp32, twice the bytes.
            parts.append(pooled.flatten(1).to(pairs.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def deep_logit(self, dense: torch.Tensor, sparse: dict[str, Jagged]) -> torch.Tensor:
        dense_vec = self.bottom(dense) if self.num_dense else None
        pooled = self.embeddings(sparse) if self.embeddings is not None else None
        return self.top(self.interact(dense_vec, pooled)).squeeze(1)
