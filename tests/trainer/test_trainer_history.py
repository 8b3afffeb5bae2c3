"""The metrics recorder: what a history record holds, how often one is written, that a failed
write never stops training, the TensorBoard extra, and the row cache's hit rate and bytes
moved reaching progress, history and Prometheus."""

from __future__ import annotations

import sys

import pytest
import torch

from engine.config import config_from_dict
from engine.metrics import trainer_snapshot
from storage.metrics_history import read_history
from tests.engine_helpers import fill_synthetic_cache, small_config_doc
from trainer.errors import TrainerConfigError
from trainer.history import MetricsRecorder, history_path
from trainer.loop import ContinuousTrainer


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _progress(samples: int, auc: float) -> dict:
    return {"total_trained_samples": samples, "total_trained_batches": samples // 128, "trained_samples": samples,
            "auc": auc, "logloss": 0.6, "samples_per_s": 1000.0, "freshness_p50_s": 1.5, "mapping_version": 0}


def test_records_first_then_every_interval_and_final_with_ingest_rate_and_lag(tmp_path):
    cfg = config_from_dict(small_config_doc(tmp_path, trainer={"history_every_s": 10.0}))
    clock = Clock()
    reads = iter([100, 600, 700])
    rec = MetricsRecorder(cfg, clock=clock, service=lambda: {"cache_read": next(reads), "dead_letters": 2, "lag": 7})
    assert rec.observe(_progress(128, 0.6)) is not None  # the run's first report
    clock.now += 5
    assert rec.observe(_progress(256, 0.61)) is None  # too soon
    clock.now += 5
    second = rec.observe(_progress(384, 0.62))
    clock.now += 1
    final = rec.record(_progress(400, 0.63), final=True)
    rec.close()
    assert second["ingest_events_per_s"] == pytest.approx(50.0) and final["ingest_events_per_s"] == pytest.approx(100.0)
    got = read_history(history_path(cfg)).records
    assert [r["samples"] for r in got] == [128, 384, 400] and [r["final"] for r in got] == [False, False, True]
    assert got[0]["ingest_events_per_s"] is None and got[1]["lag"] == 7 and got[1]["dead_letters"] == 2
    assert got[1]["auc"] == 0.62 and got[1]["freshness_p50_s"] == 1.5 and got[1]["unix_s"] == clock.now - 1
    assert len({r["run"] for r in got}) == 1 and got[0]["run_started_unix_s"] == 1_800_000_000.0


def test_a_failed_history_write_is_a_warning_not_a_stop(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint directory should be")
    cfg = config_from_dict(small_config_doc(tmp_path, trainer={"checkpoint_dir": str(blocker)}))
    rec = MetricsRecorder(cfg)
    out = rec.record(_progress(128, 0.6))
    rec.close()
    assert out["samples"] == 128 and rec.failed == 1 and rec.records == 0
    assert "metrics history: record not written" in caplog.text


def test_tensorboard_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    cfg = config_from_dict(small_config_doc(tmp_path, trainer={"tensorboard_dir": str(tmp_path / "tb")}))
    with pytest.raises(TrainerConfigError, match=r"headrace\[report\]"):
        MetricsRecorder(cfg)


def test_history_settings_are_validated(tmp_path):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="history_max_bytes"):
        config_from_dict(small_config_doc(tmp_path, trainer={"history_max_bytes": 1000}))
    with pytest.raises(ConfigError, match="history_every_s"):
        config_from_dict(small_config_doc(tmp_path, trainer={"history_every_s": -1.0}))


def test_row_cache_hit_rate_and_bytes_reach_progress_history_and_prometheus(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = config_from_dict(small_config_doc(
            tmp_path, trainer={"device": "cpu", "checkpoint_every_batches": 1000},
            row_cache={"enabled": True, "path": str(tmp_path / "rows"), "cache_rows": 100, "fsync": False}))
        fill_synthetic_cache(cfg, 1024)
        progress: list[dict] = []
        summary = ContinuousTrainer(cfg, on_progress=progress.append, progress_every_batches=4).run()
    finally:
        torch.set_num_threads(before)
    stats = summary["row_cache"]
    # 8 batches x 5 tables, each looking up its distinct rows; 100 slots of 500 rows: misses read rows.
    assert stats["lookups"] > 0 and 0 < stats["hits"] < stats["lookups"]
    assert stats["hit_rate"] == pytest.approx(stats["hits"] / stats["lookups"])
    assert stats["bytes_read"] > 0 and stats["bytes_written"] > 0  # evictions of trained rows
    assert progress[0]["row_cache"]["lookups"] < stats["lookups"]  # cumulative, growing
    snap = trainer_snapshot(summary)
    assert snap["counters"]["headrace_trainer_row_cache_hits_total"] == [[[], stats["hits"]]]
    assert snap["counters"]["headrace_trainer_row_cache_read_bytes_total"] == [[[], stats["bytes_read"]]]
    assert snap["gauges"]["headrace_trainer_row_cache_hit_ratio"] == [[[], pytest.approx(stats["hit_rate"])]]
    recorder = MetricsRecorder(cfg)
    rec = recorder.record(summary, final=True)
    recorder.close()
    assert rec["row_cache_hit_rate"] == stats["hit_rate"] and rec["row_cache_bytes_read"] == stats["bytes_read"]


def test_tensorboard_event_files_stay_under_the_bound_keeping_the_newest(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from storage.metrics_history import MIN_MAX_BYTES
    from trainer.tensorboard import SCALARS, TensorBoardSink

    log_dir = tmp_path / "tb"
    sink = TensorBoardSink(str(log_dir), max_bytes=MIN_MAX_BYTES)
    n = 300
    for i in range(1, n + 1):
        assert sink.write({"samples": 128 * i, "unix_s": 1.8e9 + i, **{key: 0.5 + i / 1e4 for _, key in SCALARS}}) \
            == len(SCALARS)
        assert sum(p.stat().st_size for p in log_dir.iterdir()) <= MIN_MAX_BYTES
    sink.close()
    assert sink.rotations >= 3
    events = EventAccumulator(str(log_dir))
    events.Reload()
    steps = [e.step for e in events.Scalars("quality/auc")]
    assert steps[-1] == 128 * n and 128 not in steps  # the oldest went, the newest stayed
    assert steps == sorted(steps) and len(steps) > 50
