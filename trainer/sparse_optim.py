"""Sparse optimizers for fused embedding tables: the update applied to the rows one batch
touched, with no sparse COO tensors and no dense gradient of the table.

The caller hands over each distinct row the batch looked up once, with the sum of its
gradients (``rows`` [U], ``grad`` [U, D] fp32); ``apply_sparse_update_`` gathers those rows
and their state, updates them in fp32 and scatters them back (``index_select`` /
``index_copy_``: measured faster on CPU than ``index_add_`` of a delta, and it is the one
shape the 16-bit write-back needs anyway). Kinds:

* ``rowwise_adagrad`` (default; FBGEMM's ``EXACT_ROWWISE_ADAGRAD``): one fp32 accumulator per
  row, ``state += mean(g**2)``, ``w -= lr * g / (sqrt(state) + eps)``; bitwise the update of
  ``trainer.row_optim.apply_row_update_``, so fused, plain and row-cached tables agree.
  With ``accumulator = per_lookup`` the accumulator adds the mean over columns of the sum of
  the row's squared *per-lookup* gradients (``square_sum``, which the collection's backward
  computes beside the summed gradient) instead of the squared sum: for a 1-wide row looked
  up once per example, the step sizes of online per-coordinate Adagrad (the first-order rows'
  default, ``[model] first_order_accumulator``).
* ``sgd``: ``w -= lr * g``, no state.
* ``adagrad``: element-wise, ``state += g**2``, ``w -= lr * g / (sqrt(state) + eps)``; the
  update of ``torch.optim.Adagrad`` on a sparse gradient (lr_decay 0, initial accumulator 0,
  eps 1e-10 by default).
* ``adam``: *lazy* Adam, the update of ``torch.optim.SparseAdam``: only the touched rows'
  moments decay and move; bias correction uses the collection's global step count. Rows a
  batch did not touch keep stale moments, unlike dense Adam.

Optimizer state is fp32 whatever the weights' dtype. 16-bit weights (bf16/fp16) are updated
in fp32 and written back with stochastic rounding (as FBGEMM does), so small updates are
not lost to round-to-nearest on average. Its random bits are a counter-based hash of
(seed, step, row, column) (``stochastic_round``): no generator state to save, the same bits
on every device, and a run resumed from a checkpoint (which holds the step) rounds bitwise
as the uninterrupted run would.

Example:
    >>> w = torch.zeros(4, 2); st = init_state(SparseOptimizerKind.ROWWISE_ADAGRAD, 4, 2)
    >>> spec = SparseOptimizerSpec(SparseOptimizerKind.ROWWISE_ADAGRAD, learning_rate=0.1)
    >>> apply_sparse_update_(spec, w, st, torch.tensor([1]), torch.ones(1, 2), step=1)
    >>> w[1].tolist(), float(st["state_sum"][1])
    ([-0.10000000149011612, -0.10000000149011612], 1.0)
"""

from __future__ import annotations

import dataclasses
import math

import torch

from trainer.config import Accumulator, SparseOptimizerKind
from trainer.errors import TrainerConfigError, TrainerError

__all__ = [
    "SparseOptimizerKind", "SparseOptimizerSpec", "state_bytes_per_row", "state_shapes",
    "init_state", "apply_sparse_update_", "stochastic_round", "WEIGHT_DTYPES", "scaled_spec",
]

#: Weight dtypes a fused table may hold; 16-bit ones are written back stochastically rounded.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_DEFAULT_EPS = {
    SparseOptimizerKind.ROWWISE_ADAGRAD: 1e-8,  # = RowCacheConfig.adagrad_eps
    SparseOptimizerKind.SGD: 0.0,
    SparseOptimizerKind.ADAGRAD: 1e-10,  # torch.optim.Adagrad
    SparseOptimizerKind.ADAM: 1e-8,  # torch.optim.SparseAdam
}


@dataclasses.dataclass(frozen=True)
class SparseOptimizerSpec:
    """A sparse optimizer and its hyper-parameters; ``eps`` None = the kind's torch default.

    Raises ``TrainerConfigError`` naming the field on a bad value."""

    kind: SparseOptimizerKind = SparseOptimizerKind.ROWWISE_ADAGRAD
    learning_rate: float = 0.01
    eps: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)  # adam only
    accumulator: Accumulator = Accumulator.BATCH  # rowwise_adagrad only; others ignore it

    def __post_init__(self):
        try:
            kind = SparseOptimizerKind(self.kind)
        except ValueError:
            raise TrainerConfigError(
                f"sparse optimizer {self.kind!r} is unknown; use one of "
                f"{[k.value for k in SparseOptimizerKind]}"
            ) from None
        object.__setattr__(self, "kind", kind)
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise TrainerConfigError(
                f"sparse optimizer learning_rate must be a finite number > 0, got {self.learning_rate}")
        eps = _DEFAULT_EPS[kind] if self.eps is None else float(self.eps)
        if kind is not SparseOptimizerKind.SGD and not eps > 0:
            raise TrainerConfigError(f"sparse optimizer eps must be > 0 for {kind.value}, got {eps}")
        object.__setattr__(self, "eps", eps)
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise TrainerConfigError(f"adam betas must lie in [0, 1), got {tuple(self.betas)}")
        object.__setattr__(self, "betas", (float(b1), float(b2)))
        object.__setattr__(self, "accumulator", Accumulator(self.accumulator))

    @property
    def per_lookup(self) -> bool:
        """Whether the update needs the per-lookup squared gradients (``square_sum``)."""
        return (self.kind is SparseOptimizerKind.ROWWISE_ADAGRAD
                and self.accumulator is Accumulator.PER_LOOKUP)


def scaled_spec(spec: SparseOptimizerSpec, scale: float) -> SparseOptimizerSpec:
    """``spec`` with its learning rate times ``scale`` (> 0): learning-rate warmup."""
    if scale == 1.0:
        return spec
    if not 0 < scale < float("inf"):
        raise TrainerConfigError(f"learning-rate scale must be a finite number > 0, got {scale}")
    return dataclasses.replace(spec, learning_rate=spec.learning_rate * scale)


def state_shapes(kind: SparseOptimizerKind, rows: int, dim: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each fp32 state tensor of a table of ``rows`` x ``dim``."""
    kind = SparseOptimizerKind(kind)
    if kind is SparseOptimizerKind.ROWWISE_ADAGRAD:
        return {"state_sum": (rows,)}
    if kind is SparseOptimizerKind.ADAGRAD:
        return {"state_sum": (rows, dim)}
    if kind is SparseOptimizerKind.ADAM:
        return {"exp_avg": (rows, dim), "exp_avg_sq": (rows, dim)}
    return {}


def state_bytes_per_row(kind: SparseOptimizerKind, dim: int) -> int:
    """Optimizer-state bytes beside each row (for the planner): 4 row-wise Adagrad,
    4*dim Adagrad, 8*dim Adam, 0 SGD."""
    return sum(4 * math.prod(shape) for shape in state_shapes(kind, 1, dim).values())


def init_state(kind: SparseOptimizerKind, rows: int, dim: int,
               device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Zeroed fp32 state tensors for a table of ``rows`` x ``dim``."""
    return {name: torch.zeros(shape, dtype=torch.float32, device=device)
            for name, shape in state_shapes(kind, rows, dim).items()}


@torch.no_grad()
def apply_sparse_update_(spec: SparseOptimizerSpec, weights: torch.Tensor,
                         state: dict[str, torch.Tensor], rows: torch.Tensor, grad: torch.Tensor,
                         *, step: int, rounding_seed: int = 0,
                         square_sum: torch.Tensor | None = None) -> None:
    """Update ``weights`` [R, D] and ``state`` in place at ``rows`` [U] from ``grad`` [U, D]
    (and, when ``spec.per_lookup``, ``square_sum`` [U, D]: each row's sum of squared
    per-lookup gradients).

    ``rows`` must be distinct (duplicates' gradients summed by the caller): a row listed twice
    would be written twice from the same old value. ``step`` counts updates from 1 (Adam's
    bias correction; the stochastic-rounding counter). Rows not listed are untouched.
    """
    if rows.numel() == 0:
        return
    rows = rows.to(torch.int64)  # index_copy_ takes int64 indices only
    kind = spec.kind
    lr, eps = spec.learning_rate, spec.eps
    grad = grad.float()
    w = weights.index_select(0, rows)
    if w.dtype != torch.float32:
        w = w.float()
    if kind is SparseOptimizerKind.SGD:
        w.sub_(grad, alpha=lr)
    elif kind is SparseOptimizerKind.ROWWISE_ADAGRAD:
        acc = state["state_sum"]
        s = acc.index_select(0, rows)
        # Bitwise row_optim.apply_row_update_: the same accumulator ops, and addcdiv_
        # computes w + ((-lr) * g) / d = w - (lr * g) / d exactly (negation is exact) in one
        # pass instead of three.
        if spec.per_lookup:
            if square_sum is None:
                raise TrainerError("the per_lookup accumulator needs square_sum")
            s.add_(square_sum.float().mean(dim=1))
        else:
            s.add_(grad.pow(2).mean(dim=1))
        w.addcdiv_(grad, s.sqrt().add_(eps).unsqueeze(1), value=-lr)
        acc.index_copy_(0, rows, s)
    elif kind is SparseOptimizerKind.ADAGRAD:
        acc = state["state_sum"]
        s = acc.index_select(0, rows)
        s.add_(grad.pow(2))  # op order of torch.optim.Adagrad's sparse branch
        w.add_(grad / s.sqrt().add_(eps), alpha=-lr)
        acc.index_copy_(0, rows, s)
    elif kind is SparseOptimizerKind.ADAM:
        beta1, beta2 = spec.betas
        m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
        m, v = m_all.index_select(0, rows), v_all.index_select(0, rows)
        # old <- old + (1 - b) * (new - old), the op order of torch's sparse_adam
        m.add_(grad.sub(m).mul_(1 - beta1))
        v.add_(grad.pow(2).sub_(v).mul_(1 - beta2))
        m_all.index_copy_(0, rows, m)
        v_all.index_copy_(0, rows, v)
        step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        w.add_(-step_size * m.div_(v.sqrt().add_(eps)))
    else:
        raise TrainerConfigError(f"unknown sparse optimizer {kind!r}")
    if weights.dtype != torch.float32:
        w = stochastic_round(w, weights.dtype, seed=rounding_seed, step=step, rows=rows)
    weights.index_copy_(0, rows, w)


_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_FP16_MIN_NORMAL = 2.0 ** -14
_FP16_MAX = 65504.0


def _as_signed(x: int, bits: int) -> int:
    x &= (1 << bits) - 1
    return x - (1 << bits) if x >= 1 << (bits - 1) else x


def _mix64_py(x: int) -> int:
    """splitmix64's finaliser on a Python int (exact, unsigned)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


# lowbias32 (C. Wellons' hash-prospector): a 32-bit finaliser with low bias, as signed int32
_MIX32_A = _as_signed(0x7FEB352D, 32)
_MIX32_B = _as_signed(0x846CA68B, 32)
_GOLDEN32 = _as_signed(0x9E3779B9, 32)


def _random_bits16(seed: int, step: int, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """[U, dim] int32 in [0, 65536): random bits per (seed, step, row, column).

    A counter-based hash: (seed, step) is mixed in Python, each row's base once in int64
    ([U] elements), then each pair of columns by lowbias32 in wrapping int32 arithmetic, in
    place, its two 16-bit halves serving the two columns (on CPU 3-4x faster than one int64
    hash per element). ``>>`` on int32 is arithmetic, so shifts are
    masked to act as logical ones. Integer ops are exact, so every device draws the same."""
    key = _mix64_py(_mix64_py(int(seed) * _GOLDEN + 1) + int(step) * _GOLDEN)
    base = rows.to(torch.int64) * _as_signed(_GOLDEN, 64) + _as_signed(key, 64)
    base = base ^ (base >> 29)
    base = (base & 0xFFFFFFFF) - ((base >> 31) & 1) * (1 << 32)  # low 32 bits, signed
    pairs = (dim + 1) // 2  # one 32-bit hash feeds two columns
    cols = torch.arange(pairs, dtype=torch.int32, device=rows.device).mul_(_GOLDEN32)
    x = base.to(torch.int32).unsqueeze(1) + cols
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    x.mul_(_MIX32_A)
    x.bitwise_xor_(x.bitwise_right_shift(15).bitwise_and_(0x1FFFF))
    x.mul_(_MIX32_B)
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    halves = torch.stack([x.bitwise_right_shift(16).bitwise_and_(0xFFFF), x.bitwise_and_(0xFFFF)], dim=2)
    return halves.view(x.shape[0], 2 * pairs)[:, :dim]


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, *, seed: int, step: int,
                     rows: torch.Tensor) -> torch.Tensor:
    """``x`` [U, D] fp32 rounded to ``dtype`` (bf16 or fp16) up or down at random, with the
    probability of rounding up equal to the fraction of the gap below x, so ``E[result] = x``
    (to within 2**-13 of a unit in the last place: 16 random bits per element).

    Deterministic: the random bits depend only on (seed, step, rows[i], column), so the same
    call rounds bitwise the same on any device and after a resume.

    Both formats round by adding random bits below the kept mantissa bits of the fp32 bit
    pattern and truncating: for finite values this rounds the magnitude up with exactly the
    wanted probability (sign-magnitude format; a carry into the exponent is the next value
    up). bf16 keeps the top 16 bits of fp32. fp16 keeps 10 of 23 mantissa bits for |x| >=
    2**-14; below that its values are multiples of 2**-24 (subnormals), rounded as
    ``floor(x * 2**24 + u) * 2**-24``; beyond its range it saturates at +-65504.
    """
    if dtype == torch.float32:
        return x
    noise = _random_bits16(seed, step, rows, x.shape[1])
    if dtype == torch.bfloat16:
        pattern = x.contiguous().view(torch.int32)
        # -65536 = 0xFFFF0000: the 16 bits bf16 keeps
        return pattern.add(noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)
    if dtype == torch.float16:
        x = x.clamp(-_FP16_MAX, _FP16_MAX)
        normal = (x.view(torch.int32) + noise.bitwise_right_shift(3)).bitwise_and_(-8192)  # ~0x1FFF
        uniform = noise.bitwise_right_shift_(2).to(torch.float32).mul_(2.0 ** -14)
        subnormal = (x * 2.0 ** 24).add_(uniform).floor_().mul_(2.0 ** -24)
        out = torch.where(x.abs() < _FP16_MIN_NORMAL, subnormal, normal.view(torch.float32))
        return out.to(torch.float16)
    raise TrainerConfigError(f"embedding dtype {dtype} is not one of {list(WEIGHT_DTYPES)}")
