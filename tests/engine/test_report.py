"""``headrace report`` over a real run directory: two trainer runs (a restart) on a real LMDB
cache with dead letters; the report's PNGs decode to real pictures, its page references them,
and it covers both runs; TensorBoard got the same scalars."""

from __future__ import annotations

import pathlib

import numpy as np
import orjson
import pyarrow as pa
import pytest

from engine.cli import main
from engine.config import config_from_dict
from engine.train import train
from storage.batch_cache import BatchCache
from tests.engine_helpers import fill_synthetic_cache, small_config_doc, write_config
from transforms.elements import DeadLetter, ProcessedBatch, Reason, Stage

FIRST_ROWS, DEAD, SECOND_ROWS = 1500, {Reason.MALFORMED_JSON: 3, Reason.MISSING_LABEL: 2}, 1000


@pytest.fixture(autouse=True)
def torch_threads_restored():
    import torch

    before = torch.get_num_threads()  # [trainer] threads = 1 sets it process-wide
    yield
    torch.set_num_threads(before)


def _write_dead_letters(cfg, first_offset: int) -> int:
    """A batch of dead letters only (no rows), as the pipeline commits one; returns the next offset."""
    dead, offset = [], first_offset
    for reason, n in DEAD.items():
        for _ in range(n):
            dead.append(DeadLetter("bench", 0, offset, 0, Stage.DECODE, reason, "bad on purpose", b"{oops"))
            offset += 1
    empty = pa.record_batch({"label": pa.array([], pa.float32())})
    with BatchCache.from_config(cfg.cache) as cache:
        cache.write(ProcessedBatch("bench", 0, first_offset, offset, 0, empty, tuple(dead), np.empty(0, np.int64),
                                   read=offset - first_offset))
    return offset


def _decoded_png(path: str) -> np.ndarray:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 400, (path, img.shape)
    return img


def test_report_covers_both_runs_with_real_plots(tmp_path, capsys):
    doc = small_config_doc(tmp_path, metrics={"listen": ""})
    doc["trainer"].update({"history_every_s": 0.0, "tensorboard_dir": str(tmp_path / "tb"), "device": "cpu",
                           "threads": 1, "checkpoint_every_batches": 1000})
    config_path = write_config(tmp_path, doc)
    cfg = config_from_dict(doc)
    fill_synthetic_cache(cfg, FIRST_ROWS)
    next_offset = _write_dead_letters(cfg, FIRST_ROWS)

    first = train(cfg, handle_signals=False)
    assert first["trained_samples"] == FIRST_ROWS

    # The restart: more rows arrive, a new trainer resumes from the checkpoint.
    fill_synthetic_cache(cfg, SECOND_ROWS, first_offset=next_offset)
    second = train(cfg, handle_signals=False)
    assert second["trained_samples"] == SECOND_ROWS
    assert second["total_trained_samples"] == FIRST_ROWS + SECOND_ROWS

    assert main(["report", "-c", str(config_path), "--out", str(tmp_path / "report"), "--json"]) == 0
    rep = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # Both runs, the first one included, and the cache's dead letters.
    assert rep["runs"] == 2 and rep["skipped_lines"] == 0
    run1, run2 = rep["run_spans"]
    assert run1["first_samples"] == cfg.trainer.batch_size and run1["last_samples"] == FIRST_ROWS
    assert run2["first_samples"] > FIRST_ROWS and run2["last_samples"] == FIRST_ROWS + SECOND_ROWS
    assert rep["trained_samples"] == FIRST_ROWS + SECOND_ROWS
    assert rep["auc"] == pytest.approx(second["auc"]) and rep["logloss"] == pytest.approx(second["logloss"])
    assert rep["dead_letters_by_reason"] == {r.value: n for r, n in DEAD.items()}

    # Real pictures: decodable PNGs of a sensible size, not one flat colour.
    assert set(rep["plots"]) == {"quality", "freshness", "throughput", "ingest", "dead_letters"}
    for path in rep["plots"].values():
        img = _decoded_png(path)
        assert img[..., :3].std() > 0.05 and len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20, path
    page = pathlib.Path(rep["index_html"]).read_text()
    for path in rep["plots"].values():
        assert f'<img src="{pathlib.Path(path).name}"' in page
    assert "history_every_s" in page and "malformed_json: 3" in page

    # TensorBoard has the same scalars at step = the model's trained samples, both runs.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    auc = {e.step: e.value for e in events.Scalars("quality/auc")}
    assert cfg.trainer.batch_size in auc and FIRST_ROWS + SECOND_ROWS in auc
    assert auc[FIRST_ROWS + SECOND_ROWS] == pytest.approx(second["auc"], rel=1e-6)
    assert "freshness/p99_s" in events.Tags()["scalars"]


def test_report_without_history_says_so(tmp_path, capsys):
    config_path = write_config(tmp_path, small_config_doc(tmp_path))
    assert main(["report", "-c", str(config_path)]) == 4
    assert "no metrics history at" in capsys.readouterr().err
