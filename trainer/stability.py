"""Stable training: learning-rate warmup and gradient clipping (``[trainer] warmup_steps``,
``clip_grad_norm``), applied by the loop around each step.

* Warmup: at step ``s`` (0-based, counted over the checkpoint lineage, so a resumed run
  continues the ramp) both learning rates are ``lr * min(1, (s + 1) / warmup_steps)``: the
  dense optimizer's param groups and the embedding collections' sparse optimizers
  (``set_lr_scale``, capability ``lr_scale``). Early steps are where a fresh model's
  gradients are largest and least informative; a ramp keeps the first MLP and interaction
  updates from overshooting. The first-order part is not warmed up (its param group says
  ``"warmup": False``, its collection is not passed): it is logistic regression, a convex
  model that needs no ramp, and training it at full rate from the first step is what keeps
  a fresh model level with logistic regression early in a stream (measured in README
  "Tuning").
* Clipping: the dense parameters' gradients are scaled to an L2 norm of at most
  ``clip_grad_norm`` (``torch.nn.utils.clip_grad_norm_``, over all of them together; under
  DDP after the all-reduce, so every rank clips alike). Embedding rows are not clipped:
  row-wise Adagrad divides each row's gradient by the root of its accumulated squares, so
  a row's step is at most ``lr * sqrt(dim)`` per coordinate on its first update and shrinks
  after, whatever the gradient's scale; clipping rows would also have to run inside every
  placement (fused, sharded, row-cached) to keep them equal. A sparse SGD or Adam optimizer
  gets no such bound: use Adagrad kinds for rows when stability matters.

Example:
    >>> w = torch.nn.Parameter(torch.zeros(2)); opt = torch.optim.SGD([w], lr=0.1)
    >>> warm = Warmup(4, opt, []); warm.apply(0); opt.param_groups[0]["lr"]
    0.025
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from trainer.embedding import capabilities_of
from trainer.errors import TrainerConfigError

__all__ = ["Warmup", "clip_dense_gradients", "warmup_factor"]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier at 0-based ``step``: linear from ``1 / warmup_steps`` to 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


class Warmup:
    """Scales the dense optimizer's learning rates (param groups without ``"warmup":
    False``) and ``collections``' sparse ones by ``warmup_factor``; ``apply(step)`` before
    each step (a no-op once the ramp is over)."""

    def __init__(self, warmup_steps: int, optimizer: torch.optim.Optimizer,
                 collections: Sequence[nn.Module]):
        self.warmup_steps = warmup_steps
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.collections = [c for c in collections if capabilities_of(c).sparse_step]
        if warmup_steps > 0:
            unable = [type(c).__name__ for c in self.collections if not capabilities_of(c).lr_scale]
            if unable:
                raise TrainerConfigError(
                    f"[trainer] warmup_steps = {warmup_steps}, but embedding collection(s) {unable} update "
                    "their rows with a learning rate they cannot scale (capability lr_scale): set "
                    "warmup_steps = 0 or use the trainer's own collections")
        self._factor: float | None = None

    def apply(self, step: int) -> None:
        factor = warmup_factor(step, self.warmup_steps)
        if factor == self._factor:
            return
        self._factor = factor
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor if group.get("warmup", True) else base
        for c in self.collections:
            if self.warmup_steps > 0:
                c.set_lr_scale(factor)


def clip_dense_gradients(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """Clip the dense (not sparse) gradients of ``params`` to L2 norm ``max_norm`` together;
    returns their norm before clipping, a 0-dim tensor on their device (no host sync), or None
    when ``max_norm`` is 0 (off) or no parameter has a dense gradient."""
    if max_norm <= 0:
        return None
    grads = [p for p in params if p.grad is not None and not p.grad.is_sparse]
    if not grads:
        return None
    return torch.nn.utils.clip_grad_norm_(grads, max_norm)
