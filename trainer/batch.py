"""Training batch types: dense matrix, jagged sparse rows per feature, labels."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Jagged", "TrainBatch"]


@dataclasses.dataclass
class Jagged:
    """Rows of one sparse feature for a batch of B samples, embedding-bag style.

    ``values`` holds table rows (int64); sample i owns ``values[offsets[i]:offsets[i+1]]``;
    ``offsets`` has B+1 entries starting at 0. A single-valued feature has offsets 0..B.
    ``weights`` (optional, float32, same length as values) scale rows in the bag sum.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.offsets.numel()) - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Jagged":
        return Jagged(
            self.values.to(device, non_blocking=non_blocking),
            self.offsets.to(device, non_blocking=non_blocking),
            None if self.weights is None else self.weights.to(device, non_blocking=non_blocking),
        )


@dataclasses.dataclass
class TrainBatch:
    """One step's input. ``dense``: [B, num_dense] float32; ``labels``: [B] float32;
    ``sparse``: feature name -> Jagged, in schema order; ``mapping_version``: the id-mapping
    version the sparse rows were produced with (the trainer migrates rows when it changes)."""

    dense: torch.Tensor
    sparse: dict[str, Jagged]
    labels: torch.Tensor
    mapping_version: int = 0

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TrainBatch":
        return TrainBatch(
            self.dense.to(device, non_blocking=non_blocking),
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.sparse.items()},
            self.labels.to(device, non_blocking=non_blocking),
            self.mapping_version,
        )

    def pin_memory(self) -> "TrainBatch":
        return TrainBatch(
            self.dense.pin_memory(),
            {k: Jagged(v.values.pin_memory(), v.offsets.pin_memory(),
                       None if v.weights is None else v.weights.pin_memory())
             for k, v in self.sparse.items()},
            self.labels.pin_memory(),
            self.mapping_version,
        )
