"""Checkpoints written in the background survive a SIGKILL at any point of the write.

A ``headrace train`` process on a real LMDB cache with a table big enough that each
background write takes a while is SIGKILLed (1) as soon as a temp checkpoint file appears,
(2) when the temp file is half written and (3) right after a background checkpoint was renamed
into place. Each time, a second ``headrace train`` resumes from the newest complete
checkpoint, and the final parameters, optimizer state and metrics equal those of an
uninterrupted run bitwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from storage.batch_cache import BatchCache
from tests.engine_helpers import last_json, write_config
from tests.trainer.test_trainer_cache import MAP_BYTES, sizes_for, write_batches

pytestmark = pytest.mark.slow

ROWS = 300_000  # 300k x 8 floats + Adagrad state: ~19 MB per checkpoint, a write of ~0.1 s


def _config(tmp_path, ckpt: str):
    doc = {
        "schema": {"dense": [{"name": "x1"}, {"name": "x2", "allow_nan": True}],
                   "sparse": [{"name": "u", "rows": ROWS}, {"name": "tags", "rows": 12, "multi": True}]},
        "cache": {"path": str(tmp_path / "cache"), "map_size_bytes": MAP_BYTES},
        "trainer": {"embedding_dim": 8, "bottom_mlp": [8], "top_mlp": [8], "batch_size": 64,
                    "checkpoint_dir": str(tmp_path / ckpt), "checkpoint_every_batches": 4,
                    "device": "cpu", "threads": 1, "checkpoint_background": True},
    }
    return write_config(tmp_path, doc, name=f"{ckpt}.toml")


def _train(config) -> dict:
    out = subprocess.run([sys.executable, "-m", "engine", "train", "-c", str(config), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return last_json(out.stdout)


def _kill_when(config, ckpt_dir, ready) -> None:
    """Start training and SIGKILL it the first time ``ready(listing)`` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "engine", "train", "-c", str(config), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
            if ready(ckpt_dir, names):
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return
            time.sleep(0.0005)
        pytest.fail(f"the trainer ended before the kill point (rc {proc.poll()}): "
                    f"{proc.stderr.read().decode()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _tmp_files(names):
    return [n for n in names if n.startswith(".ckpt-") and n.endswith(".tmp")]


def _at_temp_file(_dir, names):
    return bool(_tmp_files(names))


def _half_written(ckpt_dir, names):
    for n in _tmp_files(names):
        try:
            if os.path.getsize(os.path.join(ckpt_dir, n)) > 10_000_000:
                return True
        except FileNotFoundError:  # renamed between listing and stat
            continue
    return False


def _after_rename(_dir, names):
    # ckpt-000000000008.pt is the second periodic (background) checkpoint
    return "ckpt-000000000008.pt" in names


def _final_state(ckpt_dir):
    newest = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("ckpt-"))[-1]
    blob = torch.load(os.path.join(ckpt_dir, newest), map_location="cpu", weights_only=True)
    return newest, blob


def _assert_bitwise_equal(a, b, where="blob"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One cache and one uninterrupted run, shared by the kill points."""
    base = tmp_path_factory.mktemp("bgkill")
    with BatchCache(str(base / "cache"), map_size_bytes=MAP_BYTES) as cache:
        write_batches(cache, sizes_for(3000, seed=5))
    whole = _train(_config(base, "whole"))
    assert whole["trained_samples"] == 3000
    assert whole["final_checkpoint_s"] >= 0
    return base


@pytest.mark.parametrize("kill_point", [_at_temp_file, _half_written, _after_rename],
                         ids=["temp-file-appears", "temp-file-half-written", "just-renamed"])
def test_sigkill_during_background_checkpoint_resumes_bitwise(trained, kill_point):
    tmp_path = trained
    name = f"killed-{kill_point.__name__.strip('_')}"
    config = _config(tmp_path, name)
    ckpt_dir = str(tmp_path / name)
    _kill_when(config, ckpt_dir, kill_point)
    # the kill left no torn checkpoint: every complete one loads
    for n in os.listdir(ckpt_dir):
        if n.startswith("ckpt-"):
            torch.load(os.path.join(ckpt_dir, n), map_location="cpu", weights_only=True)
    resumed = _train(config)
    assert resumed["total_trained_samples"] == 3000
    assert not _tmp_files(os.listdir(ckpt_dir))

    name_a, a = _final_state(str(tmp_path / "whole"))
    name_b, b = _final_state(ckpt_dir)
    assert name_a == name_b
    for key in ("model", "optimizer", "metrics", "cursor", "counters"):
        _assert_bitwise_equal(a[key], b[key], key)
