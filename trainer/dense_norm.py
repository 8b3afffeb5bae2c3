"""Online standardisation of the dense features (``[model] normalize_dense``): every model kind
feeds ``(x - mean) / sqrt(var + eps)`` to its layers instead of the raw values, with the mean
and variance of every training sample seen so far.

Why: dense features arrive in their own units (seconds, prices, counts). A feature in the
hundreds drives a fresh MLP's activations and the first-order part's linear term to logits
of tens after one Adagrad step (Adagrad moves every weight by about the learning rate at
first, whatever the input's scale), and training diverges; ``log1p = true`` helps only for
counts. Standardising makes the step size mean the same for every feature.

Statistics: cumulative count, mean and sum of squared deviations per feature (fp64 buffers,
so they are checkpointed with the model), merged with each training batch *before* the batch
is normalised (Chan et al.'s parallel update). Only features are read, never labels, so the
scores stay progressive. In eval mode the stored statistics are used unchanged. A feature
with no variance yet (the first sample, a constant) is only centred. Under a multi-rank job
(``torch.distributed`` initialised with several ranks) each rank's batch sums are all-reduced
first, so every rank holds the statistics of the global batch, as one process would: the
forward pass of a training step is then collective.

Example:
    >>> norm = DenseNormalizer(1)
    >>> [round(v, 4) for v in norm(torch.tensor([[1.0], [3.0]])).flatten().tolist()]
    [-1.0, 1.0]
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DenseNormalizer"]

_EPS = 1e-6


class DenseNormalizer(nn.Module):
    """``forward(x [B, features]) -> [B, features]`` standardised (module docstring)."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(features, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(features, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Merge the batch ``x`` into the statistics (collective under a multi-rank job)."""
        x = x.to(torch.float64)
        sums = torch.cat([torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device),
                          x.sum(dim=0), (x * x).sum(dim=0)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        # No host sync (a GPU step must not wait here): an empty batch gives n_b = 0 and
        # leaves every statistic as it was through the clamped divisors.
        n_b = sums[0]
        mean_b = sums[1:1 + self.features] / n_b.clamp_min(1.0)
        m2_b = (sums[1 + self.features:] - n_b * mean_b * mean_b).clamp_min_(0.0)
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean.add_(delta * (n_b / total.clamp_min(1.0)))
        self.m2.add_(m2_b + delta * delta * (self.count * n_b / total.clamp_min(1.0)))
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(x)
        var = self.m2 / self.count.clamp_min(1.0)  # no sample yet: m2 = 0, mean = 0, x unchanged
        scale = torch.where(var > _EPS, (var + _EPS).rsqrt(), torch.ones_like(var))
        return ((x.to(torch.float64) - self.mean) * scale).to(x.dtype)
