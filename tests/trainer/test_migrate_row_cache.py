"""Row migration of SSD-resident tables (``trainer.migrate_row_cache``).

* In one process: a row-cached collection trained a few steps (its 14-row cache evicting
  every step) and migrated equals the plain fused collection trained and migrated the same
  way (1e-5, weights and row-wise Adagrad state), commits nothing, and leaves no stale row
  cached (the next step agrees too).
* Through the continuous trainer (``[row_cache]``, the real mapping-version hook, a cache
  whose batches cross from version 0 to a fitted version 1): a trainer SIGKILLed in the
  middle of the migration (after some of its row-store writes) resumes from its last
  checkpoint (taken just before the boundary) to bitwise the state of a run that was never
  killed; so does one stopped with a checkpoint right after the boundary.

The killed trainer is this file run as a script (``--worker``): it pauses inside the
migration's second row-store write and waits on stdin, so the kill lands there.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from engine.config import config_from_dict
from trainer.batch import Jagged
from trainer.cached_embedding import CachedEmbeddingBagCollection, open_row_store
from trainer.config import RowCachePolicy, RowOptimizerKind
from trainer.embedding import TableSpec
from trainer.fused_embedding import FusedEmbeddingBagCollection
from trainer.migrate import migrate_model
from trainer.sparse_optim import SparseOptimizerKind, SparseOptimizerSpec
from transforms.hash_fit import IdStats, LearnedFitParams, fit_learned
from transforms.mappers import DoubleHashMapper, ModuloMapper

# the killed worker runs one thread too: a resume is bitwise only at the same thread count
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLES = [TableSpec("a", 40, 8), TableSpec("b", 30, 8)]
LR = 0.1
HEAD = torch.linspace(-1.0, 1.0, 8)


def batches(n: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        sparse = {t.name: Jagged(torch.randint(0, t.rows, (12,), generator=g), torch.arange(13)) for t in TABLES}
        yield sparse, torch.randint(0, 2, (12,), generator=g).float()


def step(emb, sparse, labels) -> torch.Tensor:
    pooled = emb(sparse)
    torch.nn.functional.binary_cross_entropy_with_logits((pooled * HEAD).sum(dim=(1, 2)), labels).backward()
    emb.sparse_step()
    return pooled.detach()


def mappings():
    old, new, stats = {}, {}, {}
    for t in TABLES:
        rng = np.random.default_rng(t.rows)
        ids = rng.integers(0, 1 << 40, 5 * t.rows, dtype=np.int64)
        counts = rng.zipf(1.4, ids.size).clip(max=500).astype(np.float64)
        st = IdStats(ids, counts, np.zeros(ids.size))
        old[t.name] = ModuloMapper(t.rows) if t.name == "a" else DoubleHashMapper(t.rows)
        new[t.name] = fit_learned(st, t.rows, LearnedFitParams(hot_fraction=0.3, reserve_fraction=0.1))
        stats[t.name] = (ids, counts)
    return old, new, stats


def test_row_cached_migration_equals_plain_and_leaves_nothing_stale(tmp_path, monkeypatch):
    import trainer.migrate_row_cache as mrc

    monkeypatch.setattr(mrc, "CHUNK_ROWS", 16)  # several undo-logged writes per table
    store = open_row_store(str(tmp_path / "rows"), TABLES, RowOptimizerKind.ROWWISE_ADAGRAD, seed=3, sync=False)
    cached = CachedEmbeddingBagCollection(TABLES, store, cache_rows=14, policy=RowCachePolicy.LRU,
                                          learning_rate=LR, prefetch=False)
    plain = FusedEmbeddingBagCollection(TABLES, 3, optimizer=SparseOptimizerSpec(SparseOptimizerKind.ROWWISE_ADAGRAD, LR))
    data = list(batches(5))
    for sparse, labels in data[:4]:
        step(cached, sparse, labels)
        step(plain, sparse, labels)
    version = store.version
    before = {t.name: cached.table_rows(t.name)[0] for t in TABLES}
    old, new, stats = mappings()
    assert migrate_model(cached, None, old, new, stats) == {"a": 200, "b": 150}
    migrate_model(plain, None, old, new, stats)
    assert store.version == version  # written through the undo log, committed by the next flush
    for t, start in zip(TABLES, plain.table_starts):
        w, s = cached.table_rows(t.name)
        torch.testing.assert_close(w, plain.per_table_weights()[t.name], rtol=0, atol=1e-5)
        want = plain.state_sum[start:start + t.rows]
        torch.testing.assert_close(s[:, 0], want, rtol=1e-5, atol=1e-9)
        assert (w - before[t.name]).abs().max() > 1e-3  # the rows did move
    # the cache holds no pre-migration row: the next step reads migrated rows on both sides
    torch.testing.assert_close(step(cached, *data[4]), step(plain, *data[4]), rtol=0, atol=1e-5)
    assert cached.flush() == version + 1
    cached.close()


# -- through the continuous trainer -------------------------------------------------------------

BATCH = 32
BEFORE, AFTER = 6, 4  # training batches of mapping version 0, then of version 1


def loop_cfg(root: str, name: str):
    from streams.synthetic import SyntheticSpec, synthetic_config_dict

    spec = SyntheticSpec(num_dense=1, num_sparse=2, cardinality=400, seed=9)
    doc = synthetic_config_dict(spec, rows=64, embedding_dim=4)
    doc["cache"] = {"path": os.path.join(root, "cache")}
    doc["trainer"].update({"checkpoint_dir": os.path.join(root, name, "ckpt"), "batch_size": BATCH,
                           "bottom_mlp": [4], "top_mlp": [4], "checkpoint_every_batches": 2,
                           "checkpoint_background": False})
    doc["row_cache"] = {"enabled": True, "path": os.path.join(root, name, "rows"), "cache_rows": 40,
                        "fsync": False, "prefetch": True}
    doc["hash"] = {"min_events_to_fit": 150, "hot_fraction": 0.3, "reserve_fraction": 0.05}
    return spec, config_from_dict(doc)


def build_cache(root: str) -> None:
    """BEFORE batches under mapping version 0, a fit (version 1), AFTER batches under it."""
    from engine.fit_hash import current_mappings, fit_from_cache
    from storage.batch_cache import BatchCache
    from storage.id_stats import IdStatsStore
    from streams.synthetic import generate_payloads
    from transforms.process import TransformSpec, process_batch, source_batch

    spec, cfg = loop_cfg(root, "build")
    with BatchCache(cfg.cache.path) as cache:
        IdStatsStore.attach(cache, cfg.schema, cfg.hash)
        for b in range(BEFORE + AFTER):
            if b == BEFORE:
                assert fit_from_cache(cfg, cache=cache)["version"] == 1
            sb = source_batch(generate_payloads(spec, BATCH, b * BATCH), start_offset=b * BATCH)
            cache.write(process_batch(sb, TransformSpec.from_config(cfg), current_mappings(cfg)))


def run_trainer(root: str, name: str, max_batches: int | None = None) -> dict:
    """Train run ``name`` (its own checkpoints and row store) from its last checkpoint; the
    summary plus every table row and dense parameter it ends with."""
    from engine.fit_hash import migration_hook
    from trainer.embedding import collections_of
    from trainer.loop import ContinuousTrainer

    _, cfg = loop_cfg(root, name)
    hook = migration_hook(cfg)
    trainer = ContinuousTrainer(cfg, cfg.cache.path, on_mapping_change=hook, max_batches=max_batches)
    summary = trainer.run()
    rows = {}
    for path, collection in collections_of(trainer.model).items():
        for table in collection.feature_names:
            rows[f"{path}/{table}"] = collection.table_rows(table)
        collection.close()
    dense = {k: v.clone() for k, v in trainer.model.state_dict().items() if "embeddings" not in k}
    return {"summary": summary, "rows": rows, "dense": dense, "migrations": hook.reports}


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("auc", "logloss", "total_trained_samples", "mapping_version"):
        assert a["summary"][key] == b["summary"][key], key
    assert a["rows"].keys() == b["rows"].keys()
    for key, (w, s) in a["rows"].items():
        assert torch.equal(w, b["rows"][key][0]) and torch.equal(s, b["rows"][key][1]), key
    for key, v in a["dense"].items():
        assert torch.equal(v, b["dense"][key]), key


def _worker(root: str, name: str) -> None:
    """Train run ``name``, pausing in the migration's second row-store write (the test kills us there)."""
    import trainer.migrate_row_cache as mrc
    from storage.row_store import RowStore

    mrc.CHUNK_ROWS = 16
    write, calls = RowStore.write, [0]

    def write_then_pause(self, *args, **kwargs):  # only the migration writes through write()
        write(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            print("paused in migration", flush=True)
            sys.stdin.read()

    RowStore.write = write_then_pause
    run_trainer(root, name)


@pytest.mark.slow
def test_trainer_killed_mid_migration_resumes_bitwise(tmp_path):
    root = str(tmp_path)
    build_cache(root)
    whole = run_trainer(root, "whole")
    assert [(m["from"], m["to"], m["pinned_stats"]) for m in whole["migrations"]] == [(0, 1, True)]
    assert whole["summary"]["mapping_version"] == 1
    assert whole["summary"]["total_trained_batches"] == BEFORE + AFTER

    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", root, "killed"],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "paused" not in line:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    resumed = run_trainer(root, "killed")
    # the checkpoint it resumed from was taken right before the boundary: it migrated again
    assert [(m["from"], m["to"]) for m in resumed["migrations"]] == [(0, 1)]
    assert resumed["summary"]["trained_batches"] == AFTER
    assert_same_state(resumed, whole)

    # a checkpoint right after the boundary batch resumes bitwise too (no second migration)
    stopped = run_trainer(root, "after", max_batches=BEFORE + 1)
    assert [(m["from"], m["to"]) for m in stopped["migrations"]] == [(0, 1)]
    after = run_trainer(root, "after")
    assert after["migrations"] == [] and after["summary"]["trained_batches"] == AFTER - 1
    assert_same_state(after, whole)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        torch.set_num_threads(1)
        _worker(*sys.argv[2:4])
