"""FusedEmbeddingBagCollection against a per-row Python reference over a dense fp32 table,
against the plain EmbeddingBagCollection, and its checkpoint/error contracts."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.batch import Jagged
from trainer.config import RowOptimizerKind
from trainer.embedding import EmbeddingBagCollection, TableSpec
from trainer.errors import TrainerError
from trainer.fused_embedding import FusedEmbeddingBagCollection, FusedSparse
from trainer.row_optim import RowWiseOptimizer
from trainer.sparse_optim import SparseOptimizerKind

LR, EPS = 0.3, 1e-8


def random_batch(tables, batch_size, gen, *, max_bag=3, weighted=(), single=False):
    """{feature: Jagged}: bags of 0..max_bag rows (1 when ``single``), ids skewed so that
    duplicates are common; ``weighted`` features carry per-sample weights."""
    sparse = {}
    for t in tables:
        if single:
            lengths = torch.ones(batch_size, dtype=torch.int64)
        else:
            lengths = torch.randint(0, max_bag + 1, (batch_size,), generator=gen)
        n = int(lengths.sum())
        values = (torch.rand(n, generator=gen) ** 2 * t.rows).long().clamp_(max=t.rows - 1)
        offsets = torch.zeros(batch_size + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        weights = torch.rand(n, generator=gen) + 0.5 if t.name in weighted else None
        sparse[t.name] = Jagged(values, offsets, weights)
    return sparse


class ReferenceRowwise:
    """Per-row Python loops over a dense float64 table: pooling, gradient sums, row-wise
    Adagrad. Slow and obviously right."""

    def __init__(self, ebc: FusedEmbeddingBagCollection):
        self.tables = ebc.tables
        self.w = {t.name: w.double().clone() for t, w in zip(ebc.tables, ebc.per_table_weights().values())}
        self.s = {t.name: torch.zeros(t.rows, dtype=torch.float64) for t in ebc.tables}

    def forward(self, sparse):
        b_size = next(iter(sparse.values())).batch_size
        out = torch.zeros(b_size, len(self.tables), self.tables[0].dim, dtype=torch.float64)
        for f, t in enumerate(self.tables):
            j = sparse[t.name]
            for b in range(b_size):
                for k in range(int(j.offsets[b]), int(j.offsets[b + 1])):
                    wt = float(j.weights[k]) if j.weights is not None else 1.0
                    out[b, f] += wt * self.w[t.name][int(j.values[k])]
        return out

    def step(self, sparse, grad_out):
        for f, t in enumerate(self.tables):
            j = sparse[t.name]
            grads: dict[int, torch.Tensor] = {}
            for b in range(j.batch_size):
                for k in range(int(j.offsets[b]), int(j.offsets[b + 1])):
                    wt = float(j.weights[k]) if j.weights is not None else 1.0
                    r = int(j.values[k])
                    grads[r] = grads.get(r, 0) + wt * grad_out[b, f].double()
            for r, g in grads.items():
                self.s[t.name][r] += (g * g).mean()
                self.w[t.name][r] -= LR * g / (self.s[t.name][r].sqrt() + EPS)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_lookup_and_rowwise_adagrad_equal_per_row_reference(data):
    n_tables = data.draw(st.integers(1, 3), label="tables")
    rows = data.draw(st.lists(st.integers(1, 12), min_size=n_tables, max_size=n_tables), label="rows")
    dim = data.draw(st.sampled_from([1, 3, 4]), label="dim")
    batch_size = data.draw(st.integers(1, 6), label="batch")
    tables = [TableSpec(f"t{i}", r, dim) for i, r in enumerate(rows)]
    weighted = data.draw(st.sets(st.sampled_from([t.name for t in tables])), label="weighted")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    ebc = FusedEmbeddingBagCollection(tables, seed=3, learning_rate=LR, eps=EPS)
    ref = ReferenceRowwise(ebc)
    for _ in range(3):
        sparse = random_batch(tables, batch_size, gen, weighted=weighted)
        out = ebc(sparse)
        assert out.dtype == torch.float32 and out.shape == (batch_size, n_tables, dim)
        torch.testing.assert_close(out.double(), ref.forward(sparse), atol=1e-6, rtol=0)
        grad_out = torch.randn(out.shape, generator=gen)
        (out * grad_out).sum().backward()
        ebc.sparse_step()
        ref.step(sparse, grad_out)
        for t, w in ebc.per_table_weights().items():
            torch.testing.assert_close(w.double(), ref.w[t], atol=1e-6, rtol=0)


def test_forward_equals_plain_collection_and_rowwise_training_matches_row_optim():
    tables = [TableSpec("a", 50, 8), TableSpec("b", 7, 8), TableSpec("c", 1000, 8)]
    fused = FusedEmbeddingBagCollection(tables, seed=11, learning_rate=0.05, eps=1e-8)
    plain = EmbeddingBagCollection(tables, seed=11)
    for bag in plain.bags.values():
        bag.sparse = True
    row_opt = RowWiseOptimizer(list(plain.bags.values()), RowOptimizerKind.ROWWISE_ADAGRAD, lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        sparse = random_batch(tables, 32, gen, max_bag=4, weighted=("b",) if step % 2 else ())
        a, b = fused(sparse), plain(sparse)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        grad_out = torch.randn(a.shape, generator=gen)
        (a * grad_out).sum().backward()
        (b * grad_out).sum().backward()
        fused.sparse_step()
        row_opt.step()
        row_opt.zero_grad()
    for name, w in fused.per_table_weights().items():
        torch.testing.assert_close(w, plain.bags[name].weight.detach(), atol=1e-6, rtol=0)


def test_single_values_empty_bags_and_empty_batch():
    tables = [TableSpec("u", 5, 4), TableSpec("v", 3, 4)]
    ebc = FusedEmbeddingBagCollection(tables)
    w = ebc.per_table_weights()
    sparse = {"u": Jagged(torch.tensor([4, 4, 0]), torch.tensor([0, 1, 2, 3])),
              "v": Jagged(torch.tensor([2]), torch.tensor([0, 0, 1, 1]))}
    out = ebc(sparse)
    torch.testing.assert_close(out[:, 0], w["u"][[4, 4, 0]])
    torch.testing.assert_close(out[:, 1], torch.stack([torch.zeros(4), w["v"][2], torch.zeros(4)]))
    before = ebc.weights.clone()
    out.sum().backward()
    rows, grad = ebc.pending_gradient
    assert rows.tolist() == [0, 4, 7]  # buffer rows: u0, u4, v2 (v starts at 5)
    torch.testing.assert_close(grad, torch.tensor([[1.0] * 4, [2.0] * 4, [1.0] * 4]))
    ebc.sparse_step()
    changed = (ebc.weights != before).any(dim=1).nonzero().squeeze(1).tolist()
    assert changed == [0, 4, 7]

    empty = {"u": Jagged(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)),
             "v": Jagged(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))}
    out = ebc(empty)
    assert out.shape == (0, 2, 4)
    out.sum().backward()
    ebc.sparse_step()
    assert int(ebc.step) == 2


def test_prefused_batch_gives_the_same_result():
    tables = [TableSpec("a", 20, 4), TableSpec("b", 9, 4)]
    ebc = FusedEmbeddingBagCollection(tables)
    sparse = random_batch(tables, 8, torch.Generator().manual_seed(1), weighted=("a",))
    fused = ebc.fuse(sparse)
    assert isinstance(fused, FusedSparse) and fused.values.dtype == torch.int32
    assert fused.weights is not None and fused.weights[sparse["a"].values.numel():].eq(1).all()
    assert torch.equal(ebc(fused), ebc(sparse))


def _train(ebc, tables, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        sparse = random_batch(tables, 16, gen)
        out = ebc(sparse)
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        ebc.sparse_step()


@pytest.mark.parametrize("kind", list(SparseOptimizerKind))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_dict_round_trip_is_bitwise_and_resumes_bitwise(kind, dtype):
    tables = [TableSpec("a", 30, 4), TableSpec("b", 10, 4)]
    make = lambda seed: FusedEmbeddingBagCollection(tables, seed=seed, optimizer=kind,
                                                    learning_rate=0.1, embedding_dtype=dtype)
    ebc = make(0)
    _train(ebc, tables, 3, seed=5)
    sd = copy.deepcopy(ebc.state_dict())
    assert set(sd) >= {"weights", "step", "_extra_state"}
    resumed = make(99)
    resumed.load_state_dict(sd)
    for key, value in ebc.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.state_dict()[key]), key
    _train(ebc, tables, 3, seed=6)
    _train(resumed, tables, 3, seed=6)
    assert torch.equal(ebc.weights, resumed.weights)
    assert int(resumed.step) == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_rows_are_pooled_in_fp32(dtype):
    tables = [TableSpec("a", 30, 4), TableSpec("b", 10, 4)]
    low = FusedEmbeddingBagCollection(tables, seed=1, embedding_dtype=dtype)
    wide = FusedEmbeddingBagCollection(tables, seed=1)
    assert torch.equal(low.weights, wide.weights.to(dtype))  # init_rows, rounded to nearest
    wide.weights.copy_(low.weights.float())
    sparse = random_batch(tables, 16, torch.Generator().manual_seed(0), max_bag=6, weighted=("a",))
    out = low(sparse)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, wide(sparse), atol=1e-6, rtol=0)


def test_load_rejects_another_optimizer_or_layout():
    tables = [TableSpec("a", 30, 4)]
    sd = FusedEmbeddingBagCollection(tables, optimizer="adam").state_dict()
    with pytest.raises(RuntimeError, match="optimizer"):
        FusedEmbeddingBagCollection(tables).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="tables"):
        FusedEmbeddingBagCollection([TableSpec("a", 31, 4)], optimizer="adam").load_state_dict(sd)


def test_plain_state_conversion_both_ways():
    tables = [TableSpec("a", 30, 4), TableSpec("b", 10, 4)]
    plain = EmbeddingBagCollection(tables, seed=2)
    with torch.no_grad():
        for bag in plain.bags.values():
            bag.weight.mul_(3)
    fused = FusedEmbeddingBagCollection.from_plain_state(tables, plain.state_dict(), seed=0)
    sparse = random_batch(tables, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused(sparse), plain(sparse), atol=1e-6, rtol=0)
    back = EmbeddingBagCollection(tables, seed=7)
    back.load_state_dict(fused.plain_state())
    assert all(torch.equal(back.bags[n].weight, plain.bags[n].weight) for n in ("a", "b"))
    with pytest.raises(TrainerError, match="bags.b.weight"):
        fused.load_plain_state({"bags.a.weight": torch.zeros(30, 4)})


def test_gradient_accumulation_and_skipped_steps_are_explicit():
    tables = [TableSpec("a", 10, 4)]
    ebc = FusedEmbeddingBagCollection(tables)
    sparse = random_batch(tables, 4, torch.Generator().manual_seed(0), single=True)
    out = ebc(sparse)
    out.sum().backward(retain_graph=True)
    with pytest.raises(TrainerError, match="accumulation"):
        out.sum().backward()
    with pytest.raises(TrainerError, match="sparse_step"):
        ebc(sparse)
    with pytest.raises(TrainerError, match="pending"):
        ebc.state_dict()
    with torch.no_grad():
        ebc(sparse)  # scoring while a gradient is pending is fine
    before = ebc.weights.clone()
    ebc.discard_gradients()
    ebc.sparse_step()
    assert torch.equal(ebc.weights, before) and int(ebc.step) == 0
    assert list(ebc.parameters()) == []


def test_bad_batches_and_config_name_the_problem():
    tables = [TableSpec("a", 10, 4), TableSpec("b", 10, 4)]
    ebc = FusedEmbeddingBagCollection(tables)
    one = Jagged(torch.tensor([1]), torch.tensor([0, 1]))
    with pytest.raises(TrainerError, match="'b'"):
        ebc({"a": one})
    with pytest.raises(TrainerError, match="samples"):
        ebc({"a": one, "b": Jagged(torch.tensor([1, 2]), torch.tensor([0, 1, 2]))})
    with pytest.raises(TrainerError, match="offsets run from"):
        ebc({"a": one, "b": Jagged(torch.tensor([1, 2]), torch.tensor([0, 1]))})
    with pytest.raises(TrainerError, match="dim"):
        FusedEmbeddingBagCollection([TableSpec("a", 10, 4), TableSpec("b", 10, 8)])
    with pytest.raises(TrainerError, match="embedding_dtype"):
        FusedEmbeddingBagCollection(tables, embedding_dtype=torch.float64)
    with pytest.raises(TrainerError, match="unknown"):
        FusedEmbeddingBagCollection(tables, optimizer="lamb")


@pytest.mark.parametrize("consume", ["scaled", "concatenated", "summed", "permuted"])
def test_row_gradients_do_not_depend_on_the_layout_of_the_output_gradient(consume):
    """d(output) reaches backward as a transposed view, a slice of a concatenation (DLRM), an
    expanded scalar or a permuted copy; the row gradients must be the same sums."""
    tables = [TableSpec("a", 9, 4), TableSpec("b", 6, 4)]
    gen = torch.Generator().manual_seed(2)
    sparse = random_batch(tables, 5, gen, weighted=("b",))
    coeff = torch.randn(5, 2, 4, generator=gen)
    ebc = FusedEmbeddingBagCollection(tables)
    out = ebc(sparse)
    if consume == "scaled":
        loss, expected = (out * coeff).sum(), coeff
    elif consume == "concatenated":
        wide = torch.cat([torch.zeros(5, 1, 4), out, torch.zeros(5, 3, 4)], dim=1)
        loss, expected = (wide[:, 1:3] * coeff).sum(), coeff
    elif consume == "summed":
        loss, expected = out.sum(), torch.ones(5, 2, 4)
    else:
        loss, expected = (out.permute(2, 0, 1).contiguous() * coeff.permute(2, 0, 1)).sum(), coeff
    loss.backward()
    rows, grad = ebc.pending_gradient
    want: dict[int, torch.Tensor] = {}
    for f, (t, start) in enumerate(zip(tables, ebc.table_starts)):
        j = sparse[t.name]
        for b in range(5):
            for k in range(int(j.offsets[b]), int(j.offsets[b + 1])):
                wt = float(j.weights[k]) if j.weights is not None else 1.0
                r = start + int(j.values[k])
                want[r] = want.get(r, 0) + wt * expected[b, f]
    assert rows.tolist() == sorted(want)
    torch.testing.assert_close(grad, torch.stack([want[r] for r in sorted(want)]), atol=1e-6, rtol=0)


def test_converted_plain_run_continues_identically_with_its_row_state():
    tables = [TableSpec("a", 30, 4), TableSpec("b", 10, 4)]
    plain = EmbeddingBagCollection(tables, seed=2)
    for bag in plain.bags.values():
        bag.sparse = True
    opt = RowWiseOptimizer(list(plain.bags.values()), RowOptimizerKind.ROWWISE_ADAGRAD, lr=0.1)
    gen = torch.Generator().manual_seed(4)

    def plain_step(sparse, coeff):
        (plain(sparse) * coeff).sum().backward()
        opt.step()
        opt.zero_grad()

    plain_step(random_batch(tables, 8, gen), torch.randn(8, 2, 4, generator=gen))
    fused = FusedEmbeddingBagCollection.from_plain_state(
        tables, plain.state_dict(), row_state=opt.state_dict()["state"], learning_rate=0.1)
    for _ in range(2):
        sparse, coeff = random_batch(tables, 8, gen), torch.randn(8, 2, 4, generator=gen)
        plain_step(sparse, coeff)
        (fused(sparse) * coeff).sum().backward()
        fused.sparse_step()
    for name, w in fused.per_table_weights().items():
        torch.testing.assert_close(w, plain.bags[name].weight.detach(), atol=1e-6, rtol=0)


# -- CUDA (skipped without a GPU; bench/gpu_checks.sh runs them on one) --------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _to(sparse, device):
    return {name: j.to(device) for name, j in sparse.items()}


@cuda
def test_cuda_init_is_bitwise_the_cpu_init():
    tables = [TableSpec("a", 3000, 16), TableSpec("b", 7, 16), TableSpec("c", 1 << 20 | 5, 16)]
    gpu = FusedEmbeddingBagCollection(tables, seed=5, device="cuda")
    cpu = FusedEmbeddingBagCollection(tables, seed=5)
    assert gpu.weights.is_cuda and torch.equal(gpu.weights.cpu(), cpu.weights)


@cuda
def test_cuda_fuse_does_not_sync_and_equals_cpu_fuse():
    tables = [TableSpec("a", 30, 4), TableSpec("b", 10, 4)]
    gpu, cpu = FusedEmbeddingBagCollection(tables, device="cuda"), FusedEmbeddingBagCollection(tables)
    gen = torch.Generator().manual_seed(3)
    for single in (True, False):
        sparse = random_batch(tables, 16, gen, single=single, weighted=() if single else ("b",))
        on_gpu = _to(sparse, "cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fused = gpu.fuse(on_gpu)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want = cpu.fuse(sparse)
        assert torch.equal(fused.values.cpu(), want.values) and torch.equal(fused.offsets.cpu(), want.offsets)
        assert (fused.weights is None) == (want.weights is None)
        if want.weights is not None:
            assert torch.equal(fused.weights.cpu(), want.weights)


@cuda
@pytest.mark.parametrize("kind", list(SparseOptimizerKind))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_training_matches_cpu(kind, dtype):
    """Same batches on both devices: pooled outputs, row gradients and updated rows agree
    (16-bit rows within one rounding step: a last-bit difference of the fp32 update may send
    a stochastic rounding the other way)."""
    tables = [TableSpec("a", 30, 4), TableSpec("b", 10, 4)]
    make = lambda device: FusedEmbeddingBagCollection(tables, seed=0, optimizer=kind, learning_rate=0.1,
                                                      embedding_dtype=dtype, device=device)
    cpu, gpu = make("cpu"), make("cuda")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        sparse = random_batch(tables, 16, gen, weighted=("b",))
        coeff = torch.randn(16, 2, 4, generator=gen)
        a, b = cpu(sparse), gpu(_to(sparse, "cuda"))
        torch.testing.assert_close(b.cpu(), a, atol=tol, rtol=0)
        (a * coeff).sum().backward()
        (b * coeff.cuda()).sum().backward()
        (rows_a, grad_a), (rows_b, grad_b) = cpu.pending_gradient, gpu.pending_gradient
        assert torch.equal(rows_b.cpu(), rows_a)
        torch.testing.assert_close(grad_b.cpu(), grad_a, atol=tol, rtol=0)
        cpu.sparse_step()
        gpu.sparse_step()
    torch.testing.assert_close(gpu.weights.cpu().float(), cpu.weights.float(), atol=tol, rtol=0)
    assert int(gpu.step) == int(cpu.step) == 4


@cuda
def test_cuda_state_dict_resumes_on_cpu_and_back():
    tables = [TableSpec("a", 30, 4), TableSpec("b", 10, 4)]
    gpu = FusedEmbeddingBagCollection(tables, embedding_dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator().manual_seed(1)
    sparse = random_batch(tables, 8, gen)
    gpu(_to(sparse, "cuda")).sum().backward()
    gpu.sparse_step()
    cpu = FusedEmbeddingBagCollection(tables, embedding_dtype=torch.bfloat16)
    cpu.load_state_dict({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in gpu.state_dict().items()})
    assert torch.equal(cpu.weights, gpu.weights.cpu()) and int(cpu.step) == 1
    again = FusedEmbeddingBagCollection(tables, embedding_dtype=torch.bfloat16, device="cuda")
    again.load_state_dict(cpu.state_dict())
    assert torch.equal(again.weights, gpu.weights) and again.weights.is_cuda
