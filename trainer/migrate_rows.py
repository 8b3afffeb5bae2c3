"""The arithmetic of row migration for any block of a table: what each new row is made of.

``trainer.migrate`` states the rule (each new row is the access-weighted mean of its member
ids' old values; rows no known id maps to get the mean over all ids). This module computes
it for a *block* of a table, rows ``[row_start, row_end)`` and some value columns, so that
every placement runs the same code on what it holds:

* ``partial_sums`` (the sending side): for the old rows in the block, each new row's sum of
  ``weight(id) * value(id)`` over the ids the new mapping sends to it, where ``value`` counts
  only the id's old rows inside the block, plus the same sum over all ids (``glob``). A
  plain table is one block; a row shard, a column shard or an SSD table is one too, and the
  partial sums of blocks covering a table add up to the whole table's sums (the value is a
  sum over the id's old rows, so it splits over row blocks, and it is per column).
* ``member_weights`` and ``finish`` (the receiving side): for new rows ``[lo, hi)``, the
  summed weight of their member ids, and the new values from the summed partial sums.

Value columns are the table's weight columns first (``weight_cols`` of them), then its
optimizer-state columns: an id's weight value is the *sum* of its old rows (the bag sums
them), its state value their *mean* (state is per row); new weight rows are divided by the
new mapping's lookups so that a two-lookup id's rows again sum to the mean.

Everything is float64, deterministic for fixed inputs, and in chunks of ``chunk_ids`` ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

__all__ = ["MapperLike", "MigrationInputs", "PartialSums", "TensorBlock", "partial_sums", "member_weights",
           "finish", "finish_table_rows", "migrate_block", "mapped_rows"]


class MapperLike(Protocol):
    rows: int
    lookups: int

    def map(self, ids: np.ndarray) -> np.ndarray: ...


#: local rows (int64 [n], block-relative) -> their value columns, float64 [n, C]
RowReader = Callable[[torch.Tensor], torch.Tensor]


def mapped_rows(mapper: MapperLike, ids: np.ndarray) -> torch.Tensor:
    """``mapper``'s rows of ``ids`` as int64 ``[lookups, n]``."""
    r = np.asarray(mapper.map(ids))
    return torch.from_numpy(np.ascontiguousarray(r.reshape(-1, ids.shape[0]))).to(torch.int64)


@dataclasses.dataclass(frozen=True)
class MigrationInputs:
    """One feature's change ``old`` -> ``new`` and the ids with their access counts. Weights
    are the counts plus a floor (1e-6) so that ids counted zero times still move; ``total``
    is their sum."""

    old: MapperLike
    new: MapperLike
    ids: np.ndarray  # int64 [n]
    weights: torch.Tensor  # float64 [n]
    chunk_ids: int = 1 << 20

    @classmethod
    def from_stats(cls, old: MapperLike, new: MapperLike, ids: np.ndarray, counts: np.ndarray,
                   chunk_ids: int = 1 << 20) -> MigrationInputs:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        w = torch.from_numpy(np.asarray(counts, dtype=np.float64).copy()).clamp_min(0.0) + 1e-6
        return cls(old, new, ids, w, int(chunk_ids))

    @property
    def total(self) -> float:
        return float(self.weights.sum())

    def chunks(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for lo in range(0, self.ids.shape[0], self.chunk_ids):
            yield self.ids[lo:lo + self.chunk_ids], self.weights[lo:lo + self.chunk_ids]


@dataclasses.dataclass(frozen=True)
class PartialSums:
    """A block's contribution: ``rows`` int64 [U] (distinct new table rows, ascending) with
    ``sums`` float64 [U, C], and ``glob`` float64 [C] (over every id)."""

    rows: torch.Tensor
    sums: torch.Tensor
    glob: torch.Tensor

    def within(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows in ``[lo, hi)`` made relative to ``lo``, their sums)."""
        a, b = torch.searchsorted(self.rows, torch.tensor([lo, hi], device=self.rows.device)).tolist()
        return self.rows[a:b] - lo, self.sums[a:b]


def _reduce(rows: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    return uniq, torch.zeros(uniq.numel(), sums.shape[1], dtype=sums.dtype,
                             device=sums.device).index_add_(0, inverse, sums)


@torch.no_grad()
def partial_sums(inputs: MigrationInputs, read: RowReader, row_start: int, row_end: int, cols: int,
                 weight_cols: int, device: torch.device | str = "cpu", *,
                 count_column: bool = False, dense: bool = False) -> PartialSums:
    """The contribution of old rows ``[row_start, row_end)`` (``read`` gives their ``cols``
    value columns, the first ``weight_cols`` of them weights) to every new row. Ids with no
    old row in the block contribute nothing; memory is O(distinct new rows touched), or with
    ``dense`` O(table rows) for sums kept for every new row (faster: no sorting; for tables
    in memory anyway). ``count_column``: one more column summing the contributing ids'
    weights (for a block holding the whole table, each new row's ``member_weights``)."""
    device = torch.device(device)
    width = cols + int(count_column)
    table_rows = int(inputs.new.rows)
    rows = torch.arange(table_rows, device=device) if dense else torch.zeros(0, dtype=torch.int64, device=device)
    sums = torch.zeros(table_rows if dense else 0, width, dtype=torch.float64, device=device)
    glob = torch.zeros(width, dtype=torch.float64, device=device)
    for chunk, w in inputs.chunks():
        old_rows = mapped_rows(inputs.old, chunk).to(device)
        inside = (old_rows >= row_start) & (old_rows < row_end)
        keep = inside.any(dim=0).nonzero().squeeze(1)
        if keep.numel() == 0:
            continue
        old_rows, inside = old_rows.index_select(1, keep), inside.index_select(1, keep)
        w = w.to(device).index_select(0, keep)
        if bool(inside.all()):  # every old row of these ids in the block (a whole table)
            value = read(old_rows[0] - row_start)
            for r in old_rows[1:]:
                value = value + read(r - row_start)
        else:
            value = torch.zeros(keep.numel(), cols, dtype=torch.float64, device=device)
            for r, m in zip(old_rows, inside):
                at = m.nonzero().squeeze(1)
                value.index_add_(0, at, read(r.index_select(0, at) - row_start))
        if weight_cols < cols:
            value[:, weight_cols:] /= old_rows.shape[0]  # state: the mean of the old rows
        weighted = value * w[:, None]
        if count_column:
            weighted = torch.cat([weighted, w[:, None]], dim=1)
        glob += weighted.sum(dim=0)
        new_rows = mapped_rows(inputs.new, chunk[keep.cpu().numpy()]).to(device)
        if dense:
            for r in new_rows:
                sums.index_add_(0, r, weighted)
            continue
        lookups = new_rows.shape[0]
        rows, sums = _reduce(torch.cat([rows, new_rows.reshape(-1)]),
                             torch.cat([sums, weighted if lookups == 1 else weighted.repeat(lookups, 1)]))
    return PartialSums(rows, sums, glob)


@torch.no_grad()
def member_weights(inputs: MigrationInputs, lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float64 [hi - lo]: the summed weight of the ids the new mapping sends to each of new
    rows ``[lo, hi)`` (an id counts once per lookup landing there)."""
    den = torch.zeros(hi - lo, dtype=torch.float64, device=device)
    for chunk, w in inputs.chunks():
        w = w.to(device)
        for r in mapped_rows(inputs.new, chunk).to(device):
            at = ((r >= lo) & (r < hi)).nonzero().squeeze(1)
            den.index_add_(0, r.index_select(0, at) - lo, w.index_select(0, at))
    return den


@torch.no_grad()
def finish(inputs: MigrationInputs, num: torch.Tensor, den: torch.Tensor, glob: torch.Tensor,
           weight_cols: int, current: Callable[[], torch.Tensor]) -> torch.Tensor:
    """New values float64 [R, C] of R new rows from their summed partial sums ``num`` [R, C],
    ``member_weights`` ``den`` [R] and the summed ``glob`` [C]. Rows without members get the
    mean over all ids; with no ids at all, their ``current()`` values (float64 [R, C])."""
    out = torch.empty_like(num)
    members = den > 0
    out[members] = num[members] / den[members][:, None]
    total = inputs.total
    if total > 0:
        out[~members] = glob / total
    elif not bool(members.all()):
        out[~members] = current()[~members]
    out[:, :weight_cols] /= float(inputs.new.lookups)
    return out


@torch.no_grad()
def finish_table_rows(inputs: MigrationInputs, whole: PartialSums, lo: int, hi: int, weight_cols: int,
                      current: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``finish`` for new rows ``[lo, hi)`` from the partial sums of a block holding the
    whole table, made with ``count_column`` (so each row's member weight is in it)."""
    cols = whole.sums.shape[1] - 1
    rel, sums = whole.within(lo, hi)
    num = torch.zeros(hi - lo, cols + 1, dtype=torch.float64, device=whole.sums.device).index_add_(0, rel, sums)
    return finish(inputs, num[:, :cols], num[:, cols], whole.glob[:cols], weight_cols, current)


class TensorBlock:
    """In-memory tensors with one row per block row (``[R]`` or ``[R, k]``, any float dtype)
    seen as value columns side by side, the first tensor the weights; ``write`` goes
    through to them (in place)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = list(tensors)
        self.widths = [1 if t.dim() == 1 else int(t.shape[1]) for t in self.tensors]
        self.cols = sum(self.widths)
        self.weight_cols = self.widths[0]
        self.rows = int(self.tensors[0].shape[0])
        self.device = self.tensors[0].device

    def read(self, local: torch.Tensor) -> torch.Tensor:
        n = local.numel()
        return torch.cat([t.index_select(0, local).to(torch.float64).reshape(n, w)
                          for t, w in zip(self.tensors, self.widths)], dim=1)

    def read_all(self) -> torch.Tensor:
        return self.read(torch.arange(self.rows, device=self.device))

    def write(self, values: torch.Tensor) -> None:
        for t, v in zip(self.tensors, values.split(self.widths, dim=1)):
            t.copy_(v.reshape(t.shape).to(t.dtype))


def migrate_block(block: TensorBlock, inputs: MigrationInputs) -> None:
    """Migrate a whole table held in memory (``block``: its weights and optimizer state), in place."""
    whole = partial_sums(inputs, block.read, 0, block.rows, block.cols, block.weight_cols, block.device,
                         count_column=True, dense=True)
    block.write(finish_table_rows(inputs, whole, 0, block.rows, block.weight_cols, block.read_all))
