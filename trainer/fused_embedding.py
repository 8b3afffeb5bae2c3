"""All embedding tables of one dim in ONE device buffer, pooled by ONE lookup per step and
updated by a sparse optimizer on the batch's unique rows: FBGEMM's
``SplitTableBatchedEmbeddingBagsCodegen`` recipe in plain torch ops.

Same interface as ``trainer.embedding.EmbeddingBagCollection`` (``forward({feature:
Jagged}) -> [B, F, D]`` fp32, ``feature_names``, ``dim``, ``tables``), with the same initial
rows (``init_rows``), so the two give equal results.

The step (see ``FusedEmbeddingBagCollection``):

* forward: every feature's rows shifted by its table's first row in the buffer, offsets
  shifted likewise (``fuse``, which a loader may call ahead of the step), then one
  ``embedding_bag(mode="sum")`` over the buffer (fp32 weights) or one gather + fp32 pooling
  (16-bit weights, so sums are not rounded to 16 bits).
* backward: a custom autograd function receives d(output); no dense gradient of the
  buffer, no sparse COO tensor. The batch's lookups are sorted by row (stable: fixed
  summation order), runs of equal rows give the unique rows, and one ``embedding_bag`` over
  d(output) sums each row's gradient (per-sample weights applied). Measured on CPU (one
  thread, 26 x 2048 lookups): stable sort of int32 rows + ``unique_consecutive`` +
  segment-sum ``embedding_bag`` 1.8 ms; ``torch.unique(return_inverse)`` + ``index_add_``
  3.4 ms (4.9 ms on int64 rows). The result is kept as the pending gradient. On CUDA,
  ``unique_consecutive`` syncs the host once per step (its output size depends on data).
* ``sparse_step()`` (after ``backward()``, as the loop already calls it for the row-cached
  collection) applies ``trainer.sparse_optim`` to those rows. Not inside backward (as
  FBGEMM does) so that a step can still be skipped after backward (non-finite loss,
  ``discard_gradients()``), and so the update runs after the dense optimizer like the
  cached collection's.

Gradient accumulation is NOT supported: a second backward before ``sparse_step()`` (two
micro-batches, ``retain_graph``) raises ``TrainerError``, as does a forward with autograd on
while a gradient is pending. Per-sample weights receive no gradient.

State: ``state_dict()`` holds ``weights`` [sum(rows), D] (the embedding dtype), the fp32
optimizer state of ``trainer.sparse_optim.state_shapes`` (``state_sum``, or ``exp_avg`` and
``exp_avg_sq``), the int64 ``step`` and an ``_extra_state`` dict (format, optimizer kind,
tables, dtype, rounding seed): layout and optimizer are checked on load, the rounding seed
adopted, so a resumed run continues bitwise. The saved dtype may differ from this
collection's (weights are then copied with round-to-nearest). None of them is an
``nn.Parameter``, so the dense optimizer does not see the tables; for the same reason a
``model.half()`` / ``model.to(dtype)`` would convert them too: choose the table precision
with ``embedding_dtype`` instead. Under DDP pass ``broadcast_buffers=False`` (or keep this
module out of DDP), or the whole buffer is broadcast every step.

Example:
    >>> from trainer.embedding import TableSpec
    >>> ebc = FusedEmbeddingBagCollection([TableSpec("u", 10, 4), TableSpec("i", 5, 4)])
    >>> sparse = {"u": Jagged(torch.tensor([3, 3]), torch.tensor([0, 1, 2])),
    ...           "i": Jagged(torch.tensor([1, 4, 0]), torch.tensor([0, 2, 3]))}
    >>> ebc(sparse).sum().backward(); ebc.sparse_step(); int(ebc.step)
    1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.batch import Jagged
from trainer.embedding import CollectionCapabilities, TableSpec, init_rows, shared_dim
from trainer.errors import TrainerConfigError, TrainerError
from trainer.sparse_optim import (
    WEIGHT_DTYPES,
    SparseOptimizerKind,
    SparseOptimizerSpec,
    apply_sparse_update_,
    init_state,
    scaled_spec,
)

__all__ = ["FusedEmbeddingBagCollection", "FusedSparse"]

_FORMAT = 1
_INIT_CHUNK_ROWS = 1 << 20  # init_rows makes int64 [rows, D] temporaries: bound them


@dataclasses.dataclass
class FusedSparse:
    """One batch's lookups into the fused buffer: ``values`` [n] buffer rows (int32 when the
    buffer has < 2**31 rows), ``offsets`` [F*B + 1] bag boundaries, feature-major (bag
    ``f * B + b`` is feature f of sample b), ``weights`` [n] fp32 or None."""

    values: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None
    batch_size: int


class _PooledLookup(torch.autograd.Function):
    """Pooled lookup [F, B, D] whose backward hands the deduplicated row gradients to the
    collection instead of returning a gradient for the buffer. ``anchor`` is an empty tensor
    that requires grad, so autograd calls ``backward`` although no real input needs one."""

    @staticmethod
    def forward(ctx, anchor, collection, batch):
        ctx.collection, ctx.batch = collection, batch
        return collection._pool(batch).view(len(collection.feature_names), batch.batch_size,
                                            collection.dim)

    @staticmethod
    def backward(ctx, grad_pooled):
        ctx.collection._take_gradient(ctx.batch, grad_pooled)
        ctx.batch = None  # a second backward over this graph fails loudly, not silently
        return None, None, None


class FusedEmbeddingBagCollection(nn.Module):
    """Embedding tables of one dim fused in one buffer, trained by a sparse optimizer.

    ``optimizer`` is a ``SparseOptimizerKind`` (or its value) or a ``SparseOptimizerSpec``
    (then ``learning_rate``/``eps``/``betas`` are taken from it). ``embedding_dtype`` fp32,
    bf16 or fp16; 16-bit rows are initialised to the nearest value of ``init_rows`` and
    updated with stochastic rounding seeded by ``rounding_seed`` (default ``seed``).

    Call order per training step: ``forward`` -> ``loss.backward()`` -> ``sparse_step()``.
    Not thread-safe.
    """

    # Rows and optimizer state are buffers, so they travel in state_dict(): no own checkpoint.
    capabilities = CollectionCapabilities(sparse_step=True, lr_scale=True)

    def __init__(self, tables: Sequence[TableSpec], seed: int = 0, *,
                 optimizer: SparseOptimizerKind | SparseOptimizerSpec | str = SparseOptimizerKind.ROWWISE_ADAGRAD,
                 learning_rate: float = 0.01, eps: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999),
                 embedding_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, rounding_seed: int | None = None):
        super().__init__()
        self.dim = shared_dim(tables, TrainerConfigError)
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise TrainerConfigError(f"table names must be distinct, got {names}")
        for t in tables:
            if t.rows < 1:
                raise TrainerConfigError(f"table {t.name!r} needs >= 1 row, got {t.rows}")
        if embedding_dtype not in WEIGHT_DTYPES:
            raise TrainerConfigError(
                f"embedding_dtype {embedding_dtype} is not supported; use one of {list(WEIGHT_DTYPES)}")
        self.tables = tuple(tables)
        self.feature_names = tuple(names)
        self.seed = int(seed)
        self.rounding_seed = self.seed if rounding_seed is None else int(rounding_seed)
        self.optimizer = (optimizer if isinstance(optimizer, SparseOptimizerSpec) else
                          SparseOptimizerSpec(optimizer, learning_rate, eps, betas))
        self._step_spec = self.optimizer  # the optimizer with set_lr_scale's learning rate
        starts = [0]
        for t in self.tables:
            starts.append(starts[-1] + t.rows)
        self.table_starts = tuple(starts[:-1])
        self.total_rows = starts[-1]
        self._index_dtype = torch.int32 if self.total_rows < 2**31 else torch.int64
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.register_buffer("weights", torch.empty(self.total_rows, self.dim, dtype=embedding_dtype,
                                                    device=device))
        # On the buffer's device: init_rows is bitwise the same there, and a GPU hashes tens
        # of millions of rows in milliseconds where the host takes seconds.
        for t, start in zip(self.tables, self.table_starts):
            for lo in range(0, t.rows, _INIT_CHUNK_ROWS):
                hi = min(t.rows, lo + _INIT_CHUNK_ROWS)
                self.weights[start + lo:start + hi].copy_(
                    init_rows(t, torch.arange(lo, hi, device=device), self.seed))
        self._state_names = []
        for name, tensor in init_state(self.optimizer.kind, self.total_rows, self.dim, device).items():
            self.register_buffer(name, tensor)
            self._state_names.append(name)
        # ``step`` is mirrored by a host int so sparse_step never syncs a GPU to read it.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._steps = 0
        self.register_buffer("_row_starts", torch.tensor(self.table_starts, dtype=torch.int64,
                                                         device=device), persistent=False)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending_squares: torch.Tensor | None = None  # optimizer.per_lookup only

    # -- the step ------------------------------------------------------------------------

    def fuse(self, sparse: Mapping[str, Jagged]) -> FusedSparse:
        """The batch as lookups into the fused buffer: a few kernels whatever the number of
        features, no host sync on CUDA, so a loader may call it ahead of the step. Every
        feature must have the same batch size and offsets from 0 to ``values.numel()``
        (checked on CPU only: on CUDA it would sync). Features without weights get ones
        when some feature has weights."""
        try:
            jags = [sparse[name] for name in self.feature_names]
        except KeyError as exc:
            raise TrainerError(f"batch lacks sparse feature {exc.args[0]!r}; the collection serves "
                               f"{list(self.feature_names)}") from None
        batch_size = jags[0].batch_size
        for name, j in zip(self.feature_names, jags):
            if j.batch_size != batch_size:
                raise TrainerError(f"feature {name!r} has {j.batch_size} samples, "
                                   f"{self.feature_names[0]!r} has {batch_size}")
        device = self.weights.device
        counts = [j.values.numel() for j in jags]
        total = sum(counts)
        bounds = torch.stack([j.offsets for j in jags]).to(device=device, dtype=torch.int64)
        ends = bounds[:, -1]
        if device.type == "cpu":
            self._check_bounds(bounds, counts)
        values = torch.cat([j.values for j in jags]).to(device=device, dtype=torch.int64)
        # Shift each feature's rows by its table's start (one broadcast add when every feature
        # has as many values, e.g. all single-valued) and its bags by its first value.
        if all(c == counts[0] for c in counts):
            values = (values.view(len(jags), -1) + self._row_starts.unsqueeze(1)).view(-1)
        else:
            values = values + torch.repeat_interleave(self._row_starts, ends, output_size=total)
        offsets = torch.empty(len(jags) * batch_size + 1, dtype=self._index_dtype, device=device)
        torch.add(bounds[:, :-1], (ends.cumsum(0) - ends).unsqueeze(1),
                  out=offsets[:-1].view(len(jags), batch_size))
        offsets[-1:].fill_(total)
        weights = None
        if any(j.weights is not None for j in jags):
            weights = torch.cat([
                j.weights if j.weights is not None else torch.ones(n, device=j.values.device)
                for j, n in zip(jags, counts)
            ]).to(device=device, dtype=torch.float32)
        return FusedSparse(values.to(self._index_dtype), offsets, weights, batch_size)

    def _check_bounds(self, bounds: torch.Tensor, counts: list[int]) -> None:
        """Every feature's offsets start at 0 and end at its number of values (CPU only:
        reading them on CUDA would sync the device every step)."""
        ok = torch.equal(bounds[:, -1], torch.tensor(counts)) and not bool(bounds[:, 0].any())
        if ok:
            return
        for name, row, n in zip(self.feature_names, bounds.tolist(), counts):
            if row[0] != 0 or row[-1] != n:
                raise TrainerError(f"feature {name!r}: offsets run from {row[0]} to {row[-1]} but "
                                   f"there are {n} values (they must run from 0 to {n})")

    def forward(self, sparse: Mapping[str, Jagged] | FusedSparse) -> torch.Tensor:
        """Pooled embeddings [B, F, D] fp32 (a transposed view of the [F, B, D] result)."""
        batch = sparse if isinstance(sparse, FusedSparse) else self.fuse(sparse)
        if torch.is_grad_enabled():
            if self._pending is not None:
                raise TrainerError(
                    "forward() with autograd on while the previous batch's embedding gradient is "
                    "pending; call sparse_step() (or discard_gradients()) after backward(): "
                    "gradient accumulation is not supported")
            anchor = torch.empty(0, device=self.weights.device, requires_grad=True)
            pooled = _PooledLookup.apply(anchor, self, batch)
        else:
            pooled = self._pool(batch).view(len(self.feature_names), batch.batch_size, self.dim)
        return pooled.transpose(0, 1)

    @torch.no_grad()
    def sparse_step(self) -> None:
        """Apply the sparse optimizer to the rows of the pending gradient (from the last
        backward) and advance ``step``; a no-op when no gradient is pending."""
        if self._pending is None:
            return
        rows, grad = self._pending
        squares = self._pending_squares
        self.discard_gradients()
        self._steps += 1
        self.step.fill_(self._steps)
        apply_sparse_update_(self._step_spec, self.weights, self._state(), rows, grad,
                             step=self._steps, rounding_seed=self.rounding_seed, square_sum=squares)

    def set_lr_scale(self, scale: float) -> None:
        """Update with ``scale`` times ``optimizer.learning_rate`` from the next
        ``sparse_step()`` on (learning-rate warmup); not saved in checkpoints."""
        self._step_spec = scaled_spec(self.optimizer, scale)

    def discard_gradients(self) -> None:
        """Drop the pending gradient without updating (a skipped step)."""
        self._pending = None
        self._pending_squares = None

    @property
    def pending_gradient(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(unique buffer rows [U], summed fp32 gradient [U, D]) awaiting ``sparse_step``."""
        return self._pending

    @property
    def pending_square_sum(self) -> torch.Tensor | None:
        """[U, D] fp32: each pending row's sum of squared per-lookup gradients (rows as
        ``pending_gradient``'s), when the optimizer's accumulator is ``per_lookup``; else None."""
        return self._pending_squares

    def _pool(self, batch: FusedSparse) -> torch.Tensor:
        if self.weights.dtype == torch.float32:
            return F.embedding_bag(batch.values, self.weights, batch.offsets, mode="sum",
                                   per_sample_weights=batch.weights, include_last_offset=True)
        # embedding_bag on 16-bit weights returns 16-bit sums; gather, widen, then pool in fp32.
        rows = self.weights.index_select(0, batch.values).float()
        positions = torch.arange(rows.shape[0], device=rows.device, dtype=batch.offsets.dtype)
        return F.embedding_bag(positions, rows, batch.offsets, mode="sum",
                               per_sample_weights=batch.weights, include_last_offset=True)

    def _take_gradient(self, batch: FusedSparse | None, grad_pooled: torch.Tensor) -> None:
        """Sum d(output) [F, B, D] per distinct buffer row into the pending gradient."""
        if batch is None or self._pending is not None:
            raise TrainerError(
                "a second backward() reached the fused embeddings before sparse_step(); gradient "
                "accumulation (micro-batches, retain_graph) is not supported")
        n, dim = batch.values.numel(), self.dim
        features, batch_size = grad_pooled.shape[0], grad_pooled.shape[1]
        if n == 0:  # only empty bags: no row was read
            self._pending = (torch.zeros(0, dtype=torch.int64, device=grad_pooled.device),
                             torch.zeros(0, dim, device=grad_pooled.device))
            if self.optimizer.per_lookup:
                self._pending_squares = self._pending[1]
            return
        g = grad_pooled.float()
        # d(output) usually arrives as a strided view (the transpose, DLRM's concatenation):
        # read its rows in place through a 2-D view instead of copying it (a copy of the
        # transposed [F, B, D] cost 1.7 ms of a ~9 ms embedding step on CPU).
        if not (g.stride(2) == 1 and g.stride(0) % dim == 0 and g.stride(1) % dim == 0
                and g.stride(0) >= 0 and g.stride(1) >= 0):
            g = g.contiguous()
        row_f, row_b = g.stride(0) // dim, g.stride(1) // dim
        device = g.device
        grad_row_of_bag = (torch.arange(features, device=device).mul_(row_f).unsqueeze(1)
                           + torch.arange(batch_size, device=device).mul_(row_b)).reshape(-1)
        last_row = (features - 1) * row_f + (batch_size - 1) * row_b
        grad_rows = g.as_strided((max(last_row + 1, 0), dim), (dim, 1))
        lengths = (batch.offsets[1:] - batch.offsets[:-1]).to(torch.int64)
        grad_row = torch.repeat_interleave(grad_row_of_bag, lengths, output_size=n)
        # Stable: each row's gradients are summed in lookup order, the same on every run.
        sorted_rows, order = torch.sort(batch.values, stable=True)
        rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
        segments = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=device)
        torch.cumsum(counts, 0, out=segments[1:])
        psw = None if batch.weights is None else batch.weights.index_select(0, order)
        grad = F.embedding_bag(grad_row.index_select(0, order), grad_rows, segments, mode="sum",
                               per_sample_weights=psw, include_last_offset=True)
        self._pending = (rows.to(torch.int64), grad)
        if self.optimizer.per_lookup:  # the same segment sum over squared per-lookup gradients
            self._pending_squares = F.embedding_bag(
                grad_row.index_select(0, order), grad_rows.pow(2), segments, mode="sum",
                per_sample_weights=None if psw is None else psw.pow(2), include_last_offset=True)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Name -> the fp32 optimizer state tensors (one row per buffer row; the buffers
        themselves, so writes go through), e.g. for row migration."""
        return self._state()

    def _state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._state_names}

    # -- views and checkpoints -------------------------------------------------------------

    def per_table_weights(self) -> dict[str, torch.Tensor]:
        """Table name -> its rows [rows, D]: views into the buffer (writes go through)."""
        return {t.name: self.weights[s:s + t.rows] for t, s in zip(self.tables, self.table_starts)}

    def plain_state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The weights in ``EmbeddingBagCollection``'s layout, ``{prefix}bags.<name>.weight``
        (fp32 copies), for export and conversion to a plain checkpoint."""
        return {f"{prefix}bags.{name}.weight": w.float().clone()
                for name, w in self.per_table_weights().items()}

    @classmethod
    def from_plain_state(cls, tables: Sequence[TableSpec], state: Mapping[str, torch.Tensor],
                         prefix: str = "", *, row_state: Sequence[torch.Tensor] | None = None,
                         **kwargs) -> FusedEmbeddingBagCollection:
        """A collection over ``tables`` (``kwargs`` as the constructor's) holding the weights
        of an ``EmbeddingBagCollection`` state dict; see ``load_plain_state``."""
        collection = cls(tables, **kwargs)
        collection.load_plain_state(state, prefix, row_state=row_state)
        return collection

    @torch.no_grad()
    def load_plain_state(self, state: Mapping[str, torch.Tensor], prefix: str = "", *,
                         row_state: Sequence[torch.Tensor] | None = None) -> None:
        """Load weights from ``EmbeddingBagCollection``'s layout (``{prefix}bags.<name>
        .weight``); ``row_state`` optionally the per-table [rows, 1] accumulators of a
        ``RowWiseOptimizer`` (row-wise Adagrad only). Other optimizer state is reset to zero
        and ``step`` to 0. Raises ``TrainerError`` naming a missing or misshapen table."""
        views = self.per_table_weights()
        for t in self.tables:
            key = f"{prefix}bags.{t.name}.weight"
            if key not in state:
                raise TrainerError(f"plain state lacks {key!r}")
            if tuple(state[key].shape) != (t.rows, t.dim):
                raise TrainerError(f"{key!r} is {list(state[key].shape)}, table {t.name!r} is "
                                   f"[{t.rows}, {t.dim}]")
        for t in self.tables:
            views[t.name].copy_(state[f"{prefix}bags.{t.name}.weight"])
        for tensor in self._state().values():
            tensor.zero_()
        self.step.zero_()
        self._steps = 0
        self.discard_gradients()
        if row_state is not None:
            if self.optimizer.kind is not SparseOptimizerKind.ROWWISE_ADAGRAD:
                raise TrainerError(f"row_state is row-wise Adagrad state; this collection trains "
                                   f"with {self.optimizer.kind.value}")
            if len(row_state) != len(self.tables):
                raise TrainerError(f"row_state has {len(row_state)} tables, expected {len(self.tables)}")
            acc = self.state_sum
            for t, start, s in zip(self.tables, self.table_starts, row_state):
                acc[start:start + t.rows].copy_(s.reshape(t.rows))

    def get_extra_state(self) -> dict:
        return {"format": _FORMAT, "optimizer": self.optimizer.kind.value,
                "dtype": str(self.weights.dtype).removeprefix("torch."),
                "rounding_seed": self.rounding_seed,
                "tables": [[t.name, t.rows, t.dim] for t in self.tables]}

    def set_extra_state(self, state) -> None:
        # Layout and optimizer were validated in _load_from_state_dict (mismatches become load
        # errors); the rounding seed is adopted so a resumed run rounds as the saved one did.
        self.rounding_seed = int(state.get("rounding_seed", self.rounding_seed))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._pending is not None:
            raise TrainerError("state_dict() while an embedding gradient is pending: call "
                               "sparse_step() first, or the checkpoint would miss an update")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):
            mine = self.get_extra_state()
            for key in ("format", "optimizer", "tables"):
                if extra.get(key) != mine[key]:
                    error_msgs.append(
                        f"{prefix or 'fused embeddings'}: saved {key} {extra.get(key)!r} differs "
                        f"from this collection's {mine[key]!r}; convert with plain_state() / "
                        "load_plain_state() or keep the table layout and optimizer")
                    return
        self.discard_gradients()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._steps = int(self.step)
