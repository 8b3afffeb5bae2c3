"""``[trainer] max_batch_wait_ms`` on a real cache: a trickle of events is trained while the
trainer follows (the quiet stream's last partial batch too), and a run stopped and resumed
mid-trickle ends bitwise equal to an uninterrupted reading of the same cache."""

from __future__ import annotations

import threading
import time

from storage.batch_cache import BatchCache
from tests.trainer.test_trainer_cache import (  # noqa: F401 - one_torch_thread is an autouse fixture
    DEADLINE_S,
    MAP_BYTES,
    assert_same_training,
    make_cfg,
    one_torch_thread,
    write_batches,
)
from trainer.loop import ContinuousTrainer, StopReason

WAIT_MS = 300


def follow(cfg):
    """Start a following trainer on a thread; returns (trainer, stop event, result, thread)."""
    stop = threading.Event()
    trainer = ContinuousTrainer(cfg, follow=True, stop=stop, poll_interval_s=0.01)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(trainer.run()), daemon=True)
    runner.start()
    return trainer, stop, result, runner


def trickle(cache, trainer, runner, sizes, start_offset, seed, latencies):
    """Write one small batch at a time, as a slow stream would, and wait until the trainer
    has trained it (it never fills a 64-row batch by itself); returns the next offset."""
    off = start_offset
    for n in sizes:
        off = write_batches(cache, [n], start_offset=off, seed=seed)
        written = time.monotonic()
        deadline = written + DEADLINE_S
        while trainer.total_samples < off:
            assert runner.is_alive()
            assert time.monotonic() < deadline, f"trainer stuck at {trainer.total_samples}/{off}"
            time.sleep(0.005)
        latencies.append(time.monotonic() - written)
    return off


def test_trickle_is_trained_within_the_wait_and_resume_is_bitwise_equal(tmp_path):
    cfg_a = make_cfg(tmp_path, ckpt="a", max_batch_wait_ms=WAIT_MS)
    cfg_b = make_cfg(tmp_path, ckpt="b", max_batch_wait_ms=WAIT_MS)
    cfg_full = make_cfg(tmp_path, ckpt="full")  # max_batch_wait_ms = 0: full batches only
    latencies: list[float] = []
    with BatchCache(cfg_a.cache.path, map_size_bytes=MAP_BYTES) as cache:
        off = write_batches(cache, [200])  # a backlog first: cut into full batches only
        trainer, stop, first, runner = follow(cfg_a)
        off = trickle(cache, trainer, runner, [7, 3, 30, 1, 12], off, seed=5, latencies=latencies)
        stop.set()
        runner.join(DEADLINE_S)
        assert first["stop_reason"] == StopReason.STOPPED.value
        assert first["trained_samples"] == off  # nothing left pending while following

        trainer, stop, second, runner = follow(cfg_a)  # resumes from the stop's checkpoint
        off = trickle(cache, trainer, runner, [50, 90, 2, 64, 5], off, seed=6, latencies=latencies)
        stop.set()
        runner.join(DEADLINE_S)
        assert second["resumed_from"] is not None
        assert first["trained_samples"] + second["trained_samples"] == off == 464
        cuts = cache.train_cuts()
    assert len(cuts) >= 8  # each trickled batch ended a partial training batch (or filled one)
    print(f"\nmax_batch_wait_ms={WAIT_MS}: written -> trained latencies "
          f"{', '.join(f'{x:.2f}' for x in latencies)} s")

    # A reading of the whole cache from scratch (bounded, no clock) honours the recorded cuts:
    # the same batches in the same order, so the same parameters, metrics and cursor.
    whole = ContinuousTrainer(cfg_b)
    s_whole = whole.run()
    assert s_whole["trained_samples"] == 464
    assert s_whole["total_trained_batches"] == first["total_trained_batches"] + second["trained_batches"]
    assert_same_training(trainer, second, whole, s_whole)

    # With the setting off the recorded cuts are ignored: full batches as before.
    s_full = ContinuousTrainer(cfg_full).run()
    assert s_full["trained_batches"] == -(-464 // 64) < s_whole["trained_batches"]
