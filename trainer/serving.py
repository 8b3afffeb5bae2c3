"""A model rebuilt from an export package's contents, for inference.

``ServingModel(spec, dense, tables, dtype)`` builds the model the trainer builds for ``spec``
(``trainer.export.plain_model``: the same factory, every table in memory) with tables stored
as ``dtype`` and trained by nothing (a state-free sparse optimizer, so no optimizer state is
allocated), loads the dense state and copies each table in. It is never changed afterwards:
a new state is a new ``ServingModel``, which is what makes swapping one in under concurrent
readers safe (``engine.serving``).

``batch_of(record_batch)`` turns the transform chain's output (``transforms.process``: the
same columns the batch cache holds) into a ``TrainBatch`` with the trainer's own code
(``trainer.data.assemble``), and ``logits(batch)`` runs the forward pass the trainer runs
(eval mode, no autograd, bf16 autocast when ``[trainer] precision = "bf16"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from trainer.batch import TrainBatch
from trainer.config import EmbeddingDtype, Precision, SparseOptimizerKind, TrainSpec
from trainer.data import BatchLayout, Piece, assemble
from trainer.errors import TrainerError
from trainer.export import load_dense, plain_model, table_tensor, table_views

__all__ = ["ServingModel"]


@dataclasses.dataclass(frozen=True)
class _Rows:
    """What ``trainer.data.assemble`` reads of a cached batch."""

    batch: pa.RecordBatch
    mapping_version: int
    seq: int = 0


class ServingModel:
    """An immutable model for inference (see the module docstring). Thread-safe: ``logits``
    only reads parameters."""

    def __init__(self, spec: TrainSpec, dense: Mapping[str, Any], tables: Mapping[str, Mapping[str, np.ndarray]],
                 dtype: str, *, device: str | torch.device = "cpu"):
        t = dataclasses.replace(spec.trainer, sparse_optimizer=SparseOptimizerKind.SGD,
                                embedding_dtype=EmbeddingDtype(dtype))
        self.spec = dataclasses.replace(spec, trainer=t)
        self.device = torch.device(device)
        model = plain_model(self.spec)
        load_dense(model, dense, "the package's dense.pt")
        views = table_views(model)
        have = sorted(f"{c}/{n}" for c, named in tables.items() for n in named)
        want = sorted(f"{c}/{n}" for c, named in views.items() for n in named)
        if have != want:
            raise TrainerError(f"the package's tables {have} do not match the model's {want}")
        with torch.no_grad():
            for coll, named in tables.items():
                for name, arr in named.items():
                    view = views[coll][name]
                    if tuple(arr.shape) != tuple(view.shape):
                        raise TrainerError(f"table {coll}/{name} is {list(arr.shape)} in the package, "
                                           f"{list(view.shape)} in the model")
                    view.copy_(table_tensor(arr, dtype))
        self.model = model.to(self.device).eval()
        self.layout = BatchLayout.from_config(spec)
        self._autocast = torch.bfloat16 if spec.trainer.precision is Precision.BF16 else None

    def batch_of(self, rows: pa.RecordBatch, mapping_version: int) -> TrainBatch:
        """The training batch of ``rows`` (columns as the batch cache holds them)."""
        return assemble([Piece(_Rows(rows, mapping_version), 0, rows.num_rows)], self.layout)

    def logits(self, batch: TrainBatch) -> torch.Tensor:
        """Logits [B] (fp32, on the CPU) of ``batch``."""
        batch = batch.to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self._autocast or torch.bfloat16,
                                                    enabled=self._autocast is not None):
            return self.model(batch.dense, batch.sparse).float().cpu()
