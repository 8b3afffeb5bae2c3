"""A SIGKILL during an export leaves no half-written package: a child process exports a chain
(full, delta, full, delta, ...) as fast as it can and is killed at a random instant; every
package directory left is complete and loads, its chain included, and the exporter's
leftover temporary directory (if the kill hit a write) is removed by the next exporter."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import config_from_dict
from engine.export import export_package
from engine.serving import load_model
from storage.model_package import list_packages, remove_stale_temps
from tests.engine.export_helpers import export_doc, ingest, payloads, train

# A child process: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow


def _export_forever(cfg, out: Path) -> None:
    """The child: a chain full, delta, full, delta, ... of one checkpoint, until killed."""
    torch.set_num_threads(1)
    previous = None
    for i in range(1, 100_000):
        since = previous if i % 2 == 0 else None
        previous = export_package(cfg, str(out / f"pkg-{i:08d}"), since=since)["package"]


def test_sigkill_mid_export_leaves_every_visible_package_loadable(tmp_path):
    doc = export_doc(tmp_path)
    doc["schema"]["sparse"] = [{**s, "rows": 20_000} for s in doc["schema"]["sparse"]]  # slower writes
    cfg = config_from_dict(doc)
    ingest(cfg, 0, 512)
    train(cfg)
    out = tmp_path / "exports"
    out.mkdir()
    # forked, so the child starts exporting at once (no interpreter start-up to wait for)
    proc = mp.get_context("fork").Process(target=_export_forever, args=(cfg, out), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while len(list_packages(out)) < 2:
            assert proc.is_alive() and time.monotonic() < deadline, "the exporting child died or stalled"
            time.sleep(0.01)
        t0 = time.monotonic()
        while len(list_packages(out)) < 3:
            assert proc.is_alive() and time.monotonic() < deadline, "the exporting child died or stalled"
            time.sleep(0.01)
        time.sleep(random.uniform(0, time.monotonic() - t0))  # somewhere inside the next export
    finally:
        proc.kill()
        proc.join()
    packages = list_packages(out)
    visible = sorted(p for p in os.listdir(out) if not p.startswith("."))
    assert len(packages) >= 2 and visible == [os.path.basename(p) for p in packages]
    probe = payloads(90_000, 64)
    want = load_model(packages[0]).predict(probe)
    for p in packages:  # every one is whole; the deltas' chains too (one checkpoint: equal predictions)
        np.testing.assert_array_equal(load_model(p).predict(probe), want)
    remove_stale_temps(out)
    assert sorted(os.listdir(out)) == visible
