"""The continuous trainer on a real LMDB batch cache: learning, follow mode, stop, exact resume."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.config import RowCacheConfig, config_from_dict
from engine.errors import TrainerError
from storage.batch_cache import BatchCache
from trainer.loop import READER_NAME, ContinuousTrainer, StopReason
from transforms.elements import ProcessedBatch

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

MAP_BYTES = 1 << 26
DEADLINE_S = 60.0


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only spin against each other
    # (measured ~8x slower with 2 threads under load). Restored after each test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(tmp_path, ckpt="ck", **trainer):
    return config_from_dict({
        "schema": {
            "dense": [{"name": "x1"}, {"name": "x2", "allow_nan": True}],
            "sparse": [{"name": "u", "rows": 40}, {"name": "tags", "rows": 12, "multi": True}],
        },
        "cache": {"path": str(tmp_path / "cache"), "map_size_bytes": MAP_BYTES},
        "trainer": {"embedding_dim": 4, "bottom_mlp": [8, 4], "top_mlp": [8], "batch_size": 64,
                    "learning_rate": 0.1, "checkpoint_dir": str(tmp_path / ckpt),
                    "checkpoint_every_batches": 7, "metrics_window": 1000,
                    "prefetch_batches": 2, "device": "cpu", **trainer},
    })


def planted_rows(n, start, seed=0):
    """Rows with a planted signal: the click logit is a fixed function of x1 and of the row
    of ``u`` (and noise features x2, tags), so a model can learn AUC well above 0.5."""
    rng = np.random.default_rng([seed, start])
    u = rng.integers(0, 40, n)
    x1 = rng.normal(0, 1, n).astype(np.float32)
    x2 = rng.normal(0, 1, n).astype(np.float32)
    u_effect = np.where(u % 2 == 0, 1.5, -1.5)
    logit = 1.2 * x1 + u_effect
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    tags = [list(rng.integers(0, 12, int(k))) for k in rng.integers(0, 4, n)]
    offsets = np.arange(start, start + n, dtype=np.int64)
    return pa.record_batch({
        "label": pa.array(labels),
        "x1": pa.array(x1),
        "x2": pa.array(x2),
        "u": pa.array(u.astype(np.int64)),
        "tags": pa.array(tags, pa.list_(pa.int64())),
        "u.id": pa.array(u.astype(np.int64) * 1000),
        "_offset": pa.array(offsets),
        "_event_time_ms": pa.array(offsets * 10),
    })


def write_batches(cache, sizes, start_offset=0, version=0, seed=0):
    """Append one cached batch per size (partition 0 of topic 'events'); returns the next offset."""
    off = start_offset
    for n in sizes:
        rows = planted_rows(n, off, seed)
        cache.write(ProcessedBatch("events", 0, off, off + n, 0, rows, (), np.empty(0, np.int64),
                                   read=n, mapping_version=version))
        off += n
    return off


def sizes_for(total, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    while sum(out) < total:
        out.append(int(min(rng.integers(20, 150), total - sum(out))))
    return out


def params(trainer):
    """Every entry of the model's state: tensors (weights, optimizer state of the fused
    tables) cloned, the collection's extra state (layout, rounding seed) as it is."""
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in trainer.model.state_dict().items()}


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def assert_same_training(trainer_a, summary_a: dict, trainer_b, summary_b: dict) -> None:
    """Bitwise the same parameters and optimizer state, metrics and cursor."""
    pa_, pb_ = params(trainer_a), params(trainer_b)
    for k in pa_:
        assert same(pa_[k], pb_[k]), k
    for k in ("auc", "logloss", "window_auc", "window_logloss", "calibration"):
        assert summary_a[k] == summary_b[k], k
    assert summary_a["cursor"] == summary_b["cursor"]


def test_learns_planted_signal_and_registers_reader(tmp_path):
    cfg = make_cfg(tmp_path)
    with BatchCache(cfg.cache.path, map_size_bytes=MAP_BYTES) as cache:
        write_batches(cache, sizes_for(6000))
    progress = []
    summary = ContinuousTrainer(cfg, on_progress=progress.append, progress_every_batches=20).run()
    assert summary["trained_samples"] == 6000
    assert summary["stop_reason"] == StopReason.END_OF_CACHE.value
    assert summary["window_auc"] > 0.75, summary
    assert summary["auc"] > 0.7 and summary["logloss"] < 0.69
    assert progress and progress[-1]["total_trained_batches"] == 80
    with BatchCache(cfg.cache.path, map_size_bytes=MAP_BYTES) as cache:
        last = cache.last_seq()
        assert cache.reader_positions()[READER_NAME] == last  # cursor (last, its row count)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    cfg_a = make_cfg(tmp_path, ckpt="a")
    cfg_b = make_cfg(tmp_path, ckpt="b")
    with BatchCache(cfg_a.cache.path, map_size_bytes=MAP_BYTES) as cache:
        write_batches(cache, sizes_for(2500, seed=3))
    whole = ContinuousTrainer(cfg_a)
    s_whole = whole.run()

    first = ContinuousTrainer(cfg_b, max_batches=11)  # mid-way between periodic checkpoints
    s_first = first.run()
    assert s_first["stop_reason"] == StopReason.MAX_BATCHES.value and s_first["trained_batches"] == 11
    rest = ContinuousTrainer(cfg_b)
    s_rest = rest.run()
    assert s_rest["resumed_from"].endswith("ckpt-000000000011.pt")
    assert s_first["trained_samples"] + s_rest["trained_samples"] == s_whole["trained_samples"] == 2500

    assert_same_training(whole, s_whole, rest, s_rest)

    # resuming once more finds nothing new to train and changes nothing
    again = ContinuousTrainer(cfg_b).run()
    assert again["trained_samples"] == 0 and again["total_trained_samples"] == 2500


def test_follow_picks_up_new_batches_until_stopped(tmp_path):
    cfg = make_cfg(tmp_path)
    stop = threading.Event()
    trainer = ContinuousTrainer(cfg, follow=True, stop=stop, poll_interval_s=0.01)
    result = {}
    runner = threading.Thread(target=lambda: result.update(trainer.run()), daemon=True)
    runner.start()  # starts before the cache exists: follow mode waits for it

    with BatchCache(cfg.cache.path, map_size_bytes=MAP_BYTES) as cache:
        off = 0
        for chunk in range(4):
            off = write_batches(cache, sizes_for(320, seed=10 + chunk), start_offset=off)
            want = off // 64 * 64  # whole training batches only; the tail waits for more rows
            deadline = time.monotonic() + DEADLINE_S
            while trainer.total_samples < want:
                assert runner.is_alive(), result
                assert time.monotonic() < deadline, f"trainer stuck at {trainer.total_samples}/{want}"
                time.sleep(0.01)
    stop.set()
    runner.join(DEADLINE_S)
    assert not runner.is_alive()
    assert result["stop_reason"] == StopReason.STOPPED.value
    assert result["trained_samples"] == 1280 // 64 * 64

    # the rows left pending at stop are trained by the next (bounded) run
    tail = ContinuousTrainer(cfg).run()
    assert tail["trained_samples"] == 1280 - result["trained_samples"]
    assert tail["total_trained_samples"] == 1280


def test_follow_reads_batches_written_by_another_process(tmp_path):
    cfg = make_cfg(tmp_path, batch_size=50)
    with BatchCache(cfg.cache.path, map_size_bytes=MAP_BYTES) as cache:
        write_batches(cache, [100])
    stop = threading.Event()
    trainer = ContinuousTrainer(cfg, follow=True, stop=stop, poll_interval_s=0.01)
    result = {}
    runner = threading.Thread(target=lambda: result.update(trainer.run()), daemon=True)
    runner.start()
    # The writer process needs only storage + pyarrow: ship it the two helpers' source.
    writer = "\n".join([
        "import numpy as np, pyarrow as pa",
        "from storage.batch_cache import BatchCache",
        "from transforms.elements import ProcessedBatch",
        inspect.getsource(planted_rows), inspect.getsource(write_batches),
        f"with BatchCache({cfg.cache.path!r}, map_size_bytes={MAP_BYTES}) as cache:",
        "    write_batches(cache, [150, 50], start_offset=100)",
    ])
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=DEADLINE_S,
                   cwd=str(pathlib.Path(__file__).resolve().parents[2]))
    deadline = time.monotonic() + DEADLINE_S
    while trainer.total_samples < 300:
        assert runner.is_alive(), result
        assert time.monotonic() < deadline, f"trainer stuck at {trainer.total_samples}/300"
        time.sleep(0.01)
    stop.set()
    runner.join(DEADLINE_S)
    assert result["trained_samples"] == 300 and result["cursor"] == {"seq": 2, "row": 50}


def test_mapping_change_hook_and_version_boundaries(tmp_path):
    cfg = make_cfg(tmp_path)
    with BatchCache(cfg.cache.path, map_size_bytes=MAP_BYTES) as cache:
        off = write_batches(cache, [100], version=0)
        write_batches(cache, [100], start_offset=off, version=3)
    calls = []
    summary = ContinuousTrainer(
        cfg, on_mapping_change=lambda old, new, model, opt: calls.append((old, new))).run()
    assert calls == [(0, 3)]
    # 100 rows of v0 -> 64 + 36, 100 of v3 -> 64 + 36: four batches, none mixing versions
    assert summary["total_trained_batches"] == 4 and summary["mapping_version"] == 3


def test_non_finite_loss_names_the_batch_and_keeps_last_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, checkpoint_every_batches=1)
    with BatchCache(cfg.cache.path, map_size_bytes=MAP_BYTES) as cache:
        off = write_batches(cache, [64, 64])
        rows = planted_rows(64, off)
        x2 = np.asarray(rows.column("x2")).copy()
        x2[5] = np.nan  # allow_nan feature: stored, then poisons the loss
        rows = rows.set_column(2, "x2", pa.array(x2))
        cache.write(ProcessedBatch("events", 0, off, off + 64, 0, rows, (), np.empty(0, np.int64),
                                   read=64))
    trainer = ContinuousTrainer(cfg)
    with pytest.raises(TrainerError, match="non-finite loss .* cache seq 2 to 2"):
        trainer.run()
    assert trainer.checkpoints.latest().name == "ckpt-000000000002.pt"


def test_stop_before_start_and_missing_cache(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(TrainerError, match="no batch cache"):
        ContinuousTrainer(cfg).run()
    with BatchCache(cfg.cache.path, map_size_bytes=MAP_BYTES) as cache:
        write_batches(cache, [200])
    stopped = threading.Event()
    stopped.set()
    summary = ContinuousTrainer(cfg, follow=True, stop=stopped).run()
    assert summary["trained_samples"] == 0 and summary["stop_reason"] == StopReason.STOPPED.value


def test_retention_keeps_what_the_trainer_has_not_checkpointed(tmp_path):
    cfg = make_cfg(tmp_path, batch_size=50)
    with BatchCache(cfg.cache.path, map_size_bytes=MAP_BYTES) as probe:
        write_batches(probe, [100])
        per_batch = probe.stat()["bytes"]
    budget = 3 * per_batch + per_batch // 2
    with BatchCache(cfg.cache.path, map_size_bytes=MAP_BYTES, max_bytes=budget) as cache:
        off = write_batches(cache, [100] * 9, start_offset=100)  # seqs 0..9; no reader yet
        first = cache.first_seq()
        assert first > 0  # retention dropped the oldest batches before any trainer ran
        s1 = ContinuousTrainer(cfg).run()
        assert s1["skipped_cache_batches"] == first
        assert s1["trained_samples"] == 100 * (10 - first)
        assert cache.reader_positions()[READER_NAME] == 9

        write_batches(cache, [100] * 5, start_offset=off)  # seqs 10..14, far over budget
        assert cache.first_seq() == 9  # held back by the trainer's checkpointed position
        s2 = ContinuousTrainer(cfg).run()
        assert s2["skipped_cache_batches"] == 0 and s2["trained_samples"] == 500


def test_ssd_row_cache_collection_trains_and_resumes_exactly(tmp_path):
    """[row_cache] enabled: rows on SSD behind a small cache (evictions every step), with the
    loop's one-batch look-ahead feeding the collection's prefetch; stop + resume == whole run."""
    def cfg_for(name):
        # 32-sample batches touch at most 32 of u's 40 rows: fits the 32-row cache, evicts often
        base = make_cfg(tmp_path, ckpt=f"{name}-ck", batch_size=32)
        return dataclasses.replace(base, row_cache=RowCacheConfig(
            enabled=True, path=str(tmp_path / f"{name}-rows"), cache_rows=32, fsync=False))

    cfg_a, cfg_b = cfg_for("a"), cfg_for("b")
    with BatchCache(cfg_a.cache.path, map_size_bytes=MAP_BYTES) as cache:
        write_batches(cache, sizes_for(1500, seed=5))
    whole = ContinuousTrainer(cfg_a)
    s_whole = whole.run()
    assert type(whole.model.embeddings).__name__ == "CachedEmbeddingBagCollection"
    assert s_whole["trained_samples"] == 1500 and s_whole["auc"] > 0.6

    first = ContinuousTrainer(cfg_b, max_batches=19).run()
    rest = ContinuousTrainer(cfg_b)
    s_rest = rest.run()
    assert first["trained_samples"] + s_rest["trained_samples"] == 1500
    for k in ("auc", "logloss", "window_auc"):
        assert s_rest[k] == s_whole[k], k
    pa_, pb_ = params(whole), params(rest)
    for k in pa_:
        assert torch.equal(pb_[k], pa_[k]), k
