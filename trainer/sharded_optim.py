"""The sparse optimizer step on shards: the update plain training gives the same rows.

Plain training keeps every table in one ``FusedEmbeddingBagCollection`` (the schema's
tables in feature order, one buffer) and updates the rows a batch touched with
``trainer.sparse_optim.apply_sparse_update_``. A sharded collection holds those rows cut
into shards (row ranges, column ranges, whole tables, replicas), each rank its own, in fused
buffers of its own layout. ``apply_shard_update_`` updates them to the value plain training
gives them; it differs from ``apply_sparse_update_`` on the shard's buffer in two ways:

* Row-wise Adagrad of a column shard: a row's accumulator grows by the mean of g**2 over
  ALL of the table's columns, but a column shard holds only some of them. The caller sums
  the column shards' partial sums of squares (``row_square_sums``) over the table's owners
  and hands in ``row_sq_mean``; the update is then plain's with that mean.
* Stochastic rounding of 16-bit rows (``round_as_plain``): the random bits are those plain
  training draws for the same table row and column (its buffer row, its column in the
  full dim), not those of the shard's buffer position. So a bf16 shard rounds as a bf16
  plain table does (bit for bit where the fp32 values agree), and a run resumed on another
  plan rounds as the uninterrupted run would.

Everything else (SGD, element-wise Adagrad, lazy Adam, full-width row-wise Adagrad on fp32
rows) is ``apply_sparse_update_`` itself, on the same fp32 values: bitwise plain's update.
"""

from __future__ import annotations

import dataclasses

import torch

from trainer.config import SparseOptimizerKind
from trainer.errors import TrainerError
from trainer.sparse_optim import (
    SparseOptimizerSpec,
    apply_sparse_update_,
    stochastic_round,
)

__all__ = ["PlainCoordinates", "apply_shard_update_", "round_as_plain", "row_square_sums"]


@dataclasses.dataclass(frozen=True)
class PlainCoordinates:
    """Where the shards of one fused buffer sit in plain training's buffer, shard by shard
    in buffer order: ``buffer_starts`` their first buffer row (ascending), ``plain_starts``
    the plain buffer row of that row (the table's first plain row + the shard's first
    row), ``col_starts`` their first column in the table; ``full_dim`` the tables' dim.
    All int64 tensors [S] on the buffer's device."""

    buffer_starts: torch.Tensor
    plain_starts: torch.Tensor
    col_starts: torch.Tensor
    full_dim: int

    def locate(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain buffer row [U], first column [U]) of buffer rows ``rows`` [U]."""
        shard = torch.searchsorted(self.buffer_starts, rows, right=True) - 1
        return (rows - self.buffer_starts[shard] + self.plain_starts[shard],
                self.col_starts[shard])


def round_as_plain(w: torch.Tensor, dtype: torch.dtype, *, seed: int, step: int,
                   plain_rows: torch.Tensor, col_starts: torch.Tensor, full_dim: int) -> torch.Tensor:
    """``w`` [U, width] fp32 stochastically rounded to ``dtype`` with the bits plain training
    uses for rows ``plain_rows`` [U] and columns ``col_starts[i] + 0..width-1`` of a
    ``full_dim``-wide buffer. A narrower shard is placed into a full-width row for the
    draw (``stochastic_round`` rounds each element on its own), whatever the bit formula."""
    width = w.shape[1]
    if width == full_dim:
        return stochastic_round(w, dtype, seed=seed, step=step, rows=plain_rows)
    cols = col_starts.unsqueeze(1) + torch.arange(width, device=w.device)
    full = w.new_zeros(w.shape[0], full_dim).scatter_(1, cols, w)
    return stochastic_round(full, dtype, seed=seed, step=step, rows=plain_rows).gather(1, cols)


def row_square_sums(grad: torch.Tensor) -> torch.Tensor:
    """[U] fp32 sum of g**2 over a column shard's columns: its part of the row's mean."""
    return grad.float().pow(2).sum(dim=1)


@torch.no_grad()
def apply_shard_update_(spec: SparseOptimizerSpec, weights: torch.Tensor,
                        state: dict[str, torch.Tensor], rows: torch.Tensor, grad: torch.Tensor, *,
                        step: int, rounding_seed: int, coords: PlainCoordinates,
                        row_sq_mean: torch.Tensor | None = None,
                        square_sum: torch.Tensor | None = None) -> None:
    """Update ``weights`` [R, width] and ``state`` in place at the distinct buffer rows
    ``rows`` [U] from their summed gradient ``grad`` [U, width], as plain training updates
    the same table rows (see the module docstring). ``row_sq_mean`` [U]: row-wise Adagrad
    of column shards only, each row's mean of g**2 over the table's full dim (of the
    per-lookup squares under ``spec.per_lookup``); ``square_sum`` [U, width]: the rows'
    per-lookup squared gradients (``spec.per_lookup``, full-width shards)."""
    if rows.numel() == 0:
        return
    if row_sq_mean is None and weights.dtype == torch.float32:
        apply_sparse_update_(spec, weights, state, rows, grad, step=step, rounding_seed=rounding_seed,
                             square_sum=square_sum)
        return
    rows = rows.to(torch.int64)
    w = weights.index_select(0, rows).float()
    st = {name: t.index_select(0, rows) for name, t in state.items()}
    if row_sq_mean is None:
        local = torch.arange(rows.numel(), device=rows.device)
        apply_sparse_update_(spec, w, st, local, grad, step=step, square_sum=square_sum)  # fp32: no rounding
    else:
        if spec.kind is not SparseOptimizerKind.ROWWISE_ADAGRAD:
            raise TrainerError(f"row_sq_mean is row-wise Adagrad state, the optimizer is {spec.kind.value}")
        # the ops of apply_sparse_update_'s row-wise branch, with the table-wide mean
        s = st["state_sum"]
        s.add_(row_sq_mean)
        w.addcdiv_(grad.float(), s.sqrt().add_(spec.eps).unsqueeze(1), value=-spec.learning_rate)
    for name, t in state.items():
        t.index_copy_(0, rows, st[name])
    if weights.dtype != torch.float32:
        plain_rows, col_starts = coords.locate(rows)
        w = round_as_plain(w, weights.dtype, seed=rounding_seed, step=step, plain_rows=plain_rows,
                           col_starts=col_starts, full_dim=coords.full_dim)
    weights.index_copy_(0, rows, w)
