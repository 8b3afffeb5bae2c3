"""Training through the SSD row cache (cache much smaller than the table) matches plain
training of the same tables in memory (one ``FusedEmbeddingBagCollection``, the same sparse
optimizer: row-wise Adagrad or SGD): same losses, rows and states."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import RowCachePolicy, RowOptimizerKind
from trainer.batch import Jagged
from trainer.cached_embedding import CachedEmbeddingBagCollection, open_row_store
from trainer.embedding import TableSpec
from trainer.fused_embedding import FusedEmbeddingBagCollection
from trainer.prefetch import lookahead

TABLES = [TableSpec("a", 2000, 8), TableSpec("b", 600, 8)]
BATCH = 32
STEPS = 40
LR = 0.1


def zipf_rows(gen: torch.Generator, rows: int, n: int) -> torch.Tensor:
    probs = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.05
    # The same hot rows in every batch, scattered over the table.
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(rows))
    return perm[torch.multinomial(probs, n, replacement=True, generator=gen)]


def make_batches(seed: int) -> list[tuple[dict[str, Jagged], torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        lengths = torch.randint(1, 5, (BATCH,), generator=gen)  # "a" is multi-valued, weighted
        offsets_a = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        n_a = int(offsets_a[-1])
        a = Jagged(zipf_rows(gen, 2000, n_a), offsets_a, torch.rand(n_a, generator=gen) + 0.5)
        b = Jagged(zipf_rows(gen, 600, BATCH), torch.arange(BATCH + 1))
        labels = (torch.rand(BATCH, generator=gen) < 0.3).float()
        batches.append(({"a": a, "b": b}, labels))
    return batches


def make_head() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 8, 1))


@torch.no_grad()
def sgd_step(module: nn.Module) -> None:
    for p in module.parameters():
        p -= LR * p.grad


def train_plain(kind: RowOptimizerKind, batches) -> tuple[list[float], FusedEmbeddingBagCollection]:
    """The plain placement: every table in one fused buffer, updated by the same kind of
    sparse optimizer (``trainer.sparse_optim``) after each backward."""
    ebc = FusedEmbeddingBagCollection(TABLES, seed=3, optimizer=kind.value, learning_rate=LR)
    head = make_head()
    losses = []
    for sparse, labels in batches:
        loss = nn.functional.binary_cross_entropy_with_logits(head(ebc(sparse)).squeeze(1), labels)
        head.zero_grad()
        loss.backward()
        sgd_step(head)
        ebc.sparse_step()
        losses.append(loss.item())
    return losses, ebc


def plain_state(ebc: FusedEmbeddingBagCollection, name: str) -> torch.Tensor:
    """One table's optimizer state in the row store's layout [rows, state_dim]."""
    i = ebc.feature_names.index(name)
    start, rows = ebc.table_starts[i], ebc.tables[i].rows
    state = ebc.optimizer_state().get("state_sum")
    if state is None:  # SGD: no state
        return torch.zeros(rows, 0)
    return state[start:start + rows].unsqueeze(1)


def train_cached(tmp_path, kind, policy, prefetch, batches, flush_at=(13, 27), device="cpu"):
    store = open_row_store(str(tmp_path / "rows"), TABLES, kind, seed=3, sync=False)
    ebc = CachedEmbeddingBagCollection(
        TABLES, store, cache_rows={"a": 150, "b": 40}, policy=policy, optimizer=kind,
        learning_rate=LR, prefetch=prefetch, device=device)
    head = make_head().to(device)
    losses = []
    for step, ((sparse, labels), upcoming) in enumerate(lookahead(batches)):
        pooled = ebc(sparse)
        labels = labels.to(device)
        if upcoming is not None:
            ebc.prefetch(upcoming[0])  # overlaps the read of the next batch's misses
        loss = nn.functional.binary_cross_entropy_with_logits(head(pooled).squeeze(1), labels)
        head.zero_grad()
        loss.backward()
        sgd_step(head)
        ebc.sparse_step()
        losses.append(loss.item())
        if step in flush_at:
            ebc.flush()
    return losses, ebc


# The device cache on a GPU when there is one (the reference stays on the CPU).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(RowOptimizerKind))
@pytest.mark.parametrize("policy", list(RowCachePolicy))
def test_cached_training_matches_in_memory(tmp_path, kind, policy, device):
    batches = make_batches(seed=11)
    ref_losses, ref = train_plain(kind, batches)
    losses, cached = train_cached(tmp_path, kind, policy, prefetch=True, batches=batches, device=device)
    rtol = 1e-5 if device == "cpu" else 1e-4  # GPU kernels sum in another order
    try:
        # The cache really was too small: rows were evicted, written back and read again.
        assert 0.2 < cached.stats.hit_rate < 0.95
        assert cached.stats.bytes_written > 0 and cached.stats.prefetched_rows > 0
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=rtol / 10)
        ref_rows = ref.per_table_weights()
        for t in TABLES:
            weights, state = cached.table_rows(t.name)
            torch.testing.assert_close(weights, ref_rows[t.name], rtol=rtol, atol=rtol / 10)
            torch.testing.assert_close(state, plain_state(ref, t.name), rtol=rtol, atol=rtol / 100)
        # A flush makes the store alone hold the same rows.
        cached.flush()
        w_store, _ = cached.store.read("a", torch.arange(2000).numpy())
        torch.testing.assert_close(torch.from_numpy(w_store), ref_rows["a"],
                                   rtol=rtol, atol=rtol / 10)
    finally:
        cached.close()


def test_without_prefetch_the_result_is_bitwise_the_same(tmp_path):
    batches = make_batches(seed=5)
    kind, policy = RowOptimizerKind.ROWWISE_ADAGRAD, RowCachePolicy.LFU
    with_losses, with_pf = train_cached(tmp_path / "x", kind, policy, prefetch=True, batches=batches)
    without_losses, without_pf = train_cached(tmp_path / "y", kind, policy, prefetch=False, batches=batches)
    try:
        assert with_losses == without_losses
        assert torch.equal(with_pf.table_rows("a")[0], without_pf.table_rows("a")[0])
        assert without_pf.stats.prefetched_rows == 0 and with_pf.stats.prefetched_rows > 0
    finally:
        with_pf.close()
        without_pf.close()


@pytest.mark.parametrize("trainer_keys,row_cache_optimizer,message", [
    ({"sparse_optimizer": "adam"}, "rowwise_adagrad", r"\[trainer\] sparse_optimizer = 'adam'.*\[row_cache\] optimizer"),
    ({"optimizer": "adagrad"}, "rowwise_adagrad", r"\[trainer\] sparse_optimizer = 'adagrad'"),
    ({"sparse_optimizer": "sgd"}, "rowwise_adagrad",
     r"\[row_cache\] optimizer = 'rowwise_adagrad' differs from \[trainer\] sparse_optimizer = 'sgd'"),
])
def test_row_cache_trains_with_the_trainers_sparse_optimizer_only(tmp_path, trainer_keys, row_cache_optimizer,
                                                                   message):
    from engine.config import config_from_dict
    from trainer.cached_embedding import build_cached_embeddings
    from trainer.errors import TrainerConfigError

    cfg = config_from_dict({
        "schema": {"sparse": [{"name": "a", "rows": 100}]},
        "trainer": {"embedding_dim": 4, "bottom_mlp": [4], "device": "cpu", **trainer_keys},
        "row_cache": {"enabled": True, "path": str(tmp_path / "rows"), "cache_rows": 10,
                      "optimizer": row_cache_optimizer},
    })
    with pytest.raises(TrainerConfigError, match=message):
        build_cached_embeddings(cfg)


def test_row_cache_uses_the_sparse_learning_rate(tmp_path):
    from engine.config import config_from_dict
    from trainer.cached_embedding import build_cached_embeddings

    cfg = config_from_dict({
        "schema": {"sparse": [{"name": "a", "rows": 100}]},
        "trainer": {"embedding_dim": 4, "bottom_mlp": [4], "device": "cpu", "learning_rate": 0.5,
                    "sparse_learning_rate": 0.02, "sparse_optimizer": "sgd"},
        "row_cache": {"enabled": True, "path": str(tmp_path / "rows"), "cache_rows": 10, "optimizer": "sgd"},
    })
    ebc = build_cached_embeddings(cfg)
    try:
        assert ebc.learning_rate == 0.02
    finally:
        ebc.close()
