"""Sparse optimizers of fused tables against torch's own optimizers on a sparse
``nn.EmbeddingBag``; stochastic rounding of 16-bit weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer.batch import Jagged
from trainer.config import RowOptimizerKind
from trainer.embedding import TableSpec
from trainer.errors import TrainerConfigError
from trainer.fused_embedding import FusedEmbeddingBagCollection
from trainer.row_optim import RowWiseOptimizer
from trainer.sparse_optim import (
    SparseOptimizerKind,
    SparseOptimizerSpec,
    apply_sparse_update_,
    init_state,
    state_bytes_per_row,
    stochastic_round,
)

TABLES = [TableSpec("a", 40, 6), TableSpec("b", 5, 6), TableSpec("c", 300, 6)]


def batch(gen, batch_size=24):
    """Bags of 0..3 skewed ids (many duplicates), per-sample weights on ``b``."""
    sparse = {}
    for t in TABLES:
        lengths = torch.randint(0, 4, (batch_size,), generator=gen)
        n = int(lengths.sum())
        values = (torch.rand(n, generator=gen) ** 3 * t.rows).long()
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        sparse[t.name] = Jagged(values, offsets, torch.rand(n, generator=gen) if t.name == "b" else None)
    return sparse


def torch_reference(kind: SparseOptimizerKind, weight: torch.Tensor, lr: float):
    bag = nn.EmbeddingBag(weight.shape[0], weight.shape[1], mode="sum", sparse=True)
    with torch.no_grad():
        bag.weight.copy_(weight)
    if kind is SparseOptimizerKind.ROWWISE_ADAGRAD:
        opt = RowWiseOptimizer([bag], RowOptimizerKind.ROWWISE_ADAGRAD, lr=lr, eps=1e-8)
    elif kind is SparseOptimizerKind.SGD:
        opt = torch.optim.SGD(bag.parameters(), lr=lr)
    elif kind is SparseOptimizerKind.ADAGRAD:
        opt = torch.optim.Adagrad(bag.parameters(), lr=lr)
    else:
        opt = torch.optim.SparseAdam(bag.parameters(), lr=lr)
    return bag, opt


@pytest.mark.parametrize("kind", list(SparseOptimizerKind))
def test_each_kind_equals_its_torch_reference_over_several_steps(kind):
    lr = 0.05
    fused = FusedEmbeddingBagCollection(TABLES, seed=4, optimizer=kind, learning_rate=lr)
    bag, opt = torch_reference(kind, fused.weights, lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        sparse = batch(gen)
        lookups = fused.fuse(sparse)
        out = fused(lookups)
        ref = bag(lookups.values.long(), lookups.offsets[:-1].long(),
                  per_sample_weights=lookups.weights)
        ref = ref.view(len(TABLES), -1, 6).transpose(0, 1)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        grad_out = torch.randn(out.shape, generator=gen)
        (out * grad_out).sum().backward()
        (ref * grad_out).sum().backward()
        fused.sparse_step()
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            opt.step()
        opt.zero_grad()
    torch.testing.assert_close(fused.weights, bag.weight.detach(), atol=1e-6, rtol=0)
    # Accumulators grow to ~50: compare relatively (gradient sums differ in summation order).
    if kind is SparseOptimizerKind.ADAGRAD:
        torch.testing.assert_close(fused.state_sum, opt.state[bag.weight]["sum"], atol=1e-6, rtol=1e-6)
    if kind is SparseOptimizerKind.ADAM:
        torch.testing.assert_close(fused.exp_avg, opt.state[bag.weight]["exp_avg"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fused.exp_avg_sq, opt.state[bag.weight]["exp_avg_sq"], atol=1e-6,
                                   rtol=1e-6)


def test_rowwise_update_is_bitwise_row_optim():
    from trainer.row_optim import apply_row_update_

    gen = torch.Generator().manual_seed(0)
    w, grad = torch.randn(50, 8, generator=gen), torch.randn(20, 8, generator=gen)
    rows = torch.randperm(50, generator=gen)[:20]
    spec = SparseOptimizerSpec(SparseOptimizerKind.ROWWISE_ADAGRAD, learning_rate=0.1, eps=1e-8)
    state = init_state(spec.kind, 50, 8)
    state["state_sum"][rows] = torch.rand(20, generator=gen)
    ref_w, ref_s = w[rows].clone(), state["state_sum"][rows].clone().unsqueeze(1)
    apply_sparse_update_(spec, w, state, rows, grad, step=1)
    apply_row_update_(RowOptimizerKind.ROWWISE_ADAGRAD, ref_w, ref_s, grad, lr=0.1, eps=1e-8)
    assert torch.equal(w[rows], ref_w) and torch.equal(state["state_sum"][rows], ref_s[:, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_deterministic(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, generator=gen) * 0.05)
    x[0, :4] = torch.tensor([1e-6, -3e-7, 1.0, 0.0])  # fp16 subnormals, exact values
    rows = torch.arange(4)
    draws = torch.stack([stochastic_round(x, dtype, seed=7, step=s, rows=rows).float()
                         for s in range(1, 2001)])
    nearest = x.to(dtype).float()
    ulp = (torch.nextafter(x.to(dtype), torch.full_like(x, float("inf")).to(dtype)).float()
           - x.to(dtype).float()).abs()
    # every draw is one of the two neighbours of x
    assert ((draws - x).abs() <= ulp * 1.01 + 1e-12).all()
    # mean within 5 standard errors (a Bernoulli over one ulp has sd <= ulp/2)
    err = (draws.mean(0) - x).abs()
    assert (err <= 5 * 0.5 * ulp / 2000 ** 0.5 + 1e-12).all(), float((err / ulp).max())
    # far better than round-to-nearest on average for values between two neighbours
    assert err.mean() < (nearest - x).abs().mean() / 4
    assert draws[:, 0, 2].eq(1.0).all() and draws[:, 0, 3].eq(0.0).all()
    again = stochastic_round(x, dtype, seed=7, step=5, rows=rows)
    assert torch.equal(again, stochastic_round(x, dtype, seed=7, step=5, rows=rows))
    assert not torch.equal(again, stochastic_round(x, dtype, seed=8, step=5, rows=rows))
    assert not torch.equal(again, stochastic_round(x, dtype, seed=7, step=6, rows=rows))


@settings(max_examples=30, deadline=None)
@given(st.floats(-1e4, 1e4, allow_nan=False, width=32), st.integers(0, 2**20), st.integers(0, 10**6))
def test_stochastic_rounding_picks_a_neighbour(value, step, row):
    x = torch.tensor([[value]], dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        y = stochastic_round(x, dtype, seed=1, step=step, rows=torch.tensor([row])).float()
        down = x.to(dtype)
        lo = torch.minimum(torch.nextafter(down, torch.tensor(float("-inf"), dtype=dtype)).float(), x)
        hi = torch.maximum(torch.nextafter(down, torch.tensor(float("inf"), dtype=dtype)).float(), x)
        assert lo <= y <= hi


def test_bf16_training_stays_close_to_fp32():
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        ebc = FusedEmbeddingBagCollection(TABLES, seed=1, learning_rate=0.05, embedding_dtype=dtype)
        gen = torch.Generator().manual_seed(3)
        target = torch.randn(24, len(TABLES), 6, generator=torch.Generator().manual_seed(9))
        losses = []
        for _ in range(40):
            out = ebc(batch(gen))
            loss = ((out - target) ** 2).mean()
            loss.backward()
            ebc.sparse_step()
            losses.append(float(loss.detach()))
        runs[dtype] = (ebc.weights.float(), losses)
    w32, l32 = runs[torch.float32]
    w16, l16 = runs[torch.bfloat16]
    assert l32[-1] < l32[0]
    assert abs(l16[-1] - l32[-1]) < 0.02 * l32[0]
    assert (w16 - w32).abs().max() < 0.02


def test_state_bytes_and_spec_validation():
    assert state_bytes_per_row(SparseOptimizerKind.ROWWISE_ADAGRAD, 16) == 4
    assert state_bytes_per_row(SparseOptimizerKind.ADAGRAD, 16) == 64
    assert state_bytes_per_row(SparseOptimizerKind.ADAM, 16) == 128
    assert state_bytes_per_row(SparseOptimizerKind.SGD, 16) == 0
    assert SparseOptimizerSpec("adagrad").eps == 1e-10
    with pytest.raises(TrainerConfigError, match="learning_rate"):
        SparseOptimizerSpec(learning_rate=0)
    with pytest.raises(TrainerConfigError, match="betas"):
        SparseOptimizerSpec("adam", betas=(0.9, 1.0))


# -- CUDA (skipped without a GPU; bench/gpu_checks.sh runs them on one) --------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_stochastic_rounding_is_bitwise_the_cpu_rounding(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 13, generator=gen) * 0.05
    x[0, :4] = torch.tensor([1e-6, -3e-7, 7e4, -7e4])  # fp16 subnormals and saturation
    rows = torch.randperm(1000, generator=gen)[:64]
    want = stochastic_round(x, dtype, seed=3, step=11, rows=rows)
    got = stochastic_round(x.cuda(), dtype, seed=3, step=11, rows=rows.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), want)


@cuda
@pytest.mark.parametrize("kind", list(SparseOptimizerKind))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_update_matches_cpu(kind, dtype):
    spec = SparseOptimizerSpec(kind, learning_rate=0.05)
    gen = torch.Generator().manual_seed(2)
    weights = {"cpu": (torch.randn(50, 8, generator=gen) * 0.1).to(dtype)}
    weights["cuda"] = weights["cpu"].cuda()
    state = {dev: init_state(kind, 50, 8, dev) for dev in ("cpu", "cuda")}
    for step in range(1, 4):
        rows = torch.randperm(50, generator=gen)[:12]
        grad = torch.randn(12, 8, generator=gen)
        for dev in ("cpu", "cuda"):
            apply_sparse_update_(spec, weights[dev], state[dev], rows.to(dev), grad.to(dev), step=step,
                                 rounding_seed=9)
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # 16-bit: one rounding step at most
    torch.testing.assert_close(weights["cuda"].cpu().float(), weights["cpu"].float(), atol=tol, rtol=0)
    for name, tensor in state["cpu"].items():
        torch.testing.assert_close(state["cuda"][name].cpu(), tensor, atol=1e-6, rtol=1e-5)
