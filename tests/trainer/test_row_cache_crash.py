"""Crash test: SIGKILL a trainer that uses the SSD row cache mid-run, restart it from its last
checkpoint, and reach exactly the state of an uninterrupted run.

The trainer is this file run as a script (``--worker``): a cached embedding collection and
a linear head, checkpointing every few steps the way the continuous trainer does (flush the
rows, then atomically write a checkpoint holding ``checkpoint_state()``). ``--pause-at``
makes it stop and wait on stdin at a chosen point so the kill lands there deterministically:
after rows written back past the last checkpoint, between the row store's commit and the
checkpoint file (the store must then go back one version), or inside a row-store write
after its undo entries are durable and before the rows themselves are written.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 30
CHECKPOINT_EVERY = 6


def _worker(out_dir: str, pause_at: int, pause_where: str) -> None:
    from engine.config import RowCachePolicy, RowOptimizerKind
    from trainer.batch import Jagged
    from trainer.cached_embedding import CachedEmbeddingBagCollection, open_row_store
    from trainer.embedding import TableSpec

    tables = [TableSpec("user", 3000, 8), TableSpec("item", 1000, 8)]
    store = open_row_store(os.path.join(out_dir, "rows"), tables, RowOptimizerKind.ROWWISE_ADAGRAD,
                           seed=1, sync=True)
    ebc = CachedEmbeddingBagCollection(tables, store, cache_rows=200, policy=RowCachePolicy.LFU,
                                       learning_rate=0.1)
    torch.manual_seed(0)
    head = nn.Linear(16, 1)
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    start, losses = 0, []
    if os.path.exists(ckpt):
        saved = torch.load(ckpt, weights_only=False)
        head.load_state_dict(saved["head"])
        ebc.load_checkpoint_state(saved["embeddings"])
        start, losses = saved["step"], saved["losses"]

    def batch(step: int):
        gen = torch.Generator().manual_seed(1000 + step)
        probs = 1.0 / torch.arange(1, 3001, dtype=torch.float64) ** 1.05
        user = torch.multinomial(probs, 64, replacement=True, generator=gen)
        item = torch.randint(0, 1000, (64,), generator=gen)
        labels = (torch.rand(64, generator=gen) < 0.25).float()
        offsets = torch.arange(65)
        return {"user": Jagged(user, offsets), "item": Jagged(item, offsets)}, labels

    def pause(where: str, step: int) -> None:
        if pause_at == step and pause_where == where:
            print(f"paused {where} {step}", flush=True)
            sys.stdin.read()  # the test kills us here

    current = {"step": start}
    if pause_where == "undo":
        log_undo = store._log_undo

        def log_then_pause(items):  # runs in the prefetch thread, inside write_many
            log_undo(items)
            # The job may run while the loop is already on the next step: the first write
            # from step pause_at on (both before the checkpoint after step 17).
            if current["step"] >= pause_at:
                pause("undo", pause_at)

        store._log_undo = log_then_pause

    for step in range(start, STEPS):
        current["step"] = step
        sparse, labels = batch(step)
        pooled = ebc(sparse)
        if step + 1 < STEPS:
            ebc.prefetch(batch(step + 1)[0])
        loss = nn.functional.binary_cross_entropy_with_logits(head(pooled.flatten(1)).squeeze(1), labels)
        head.zero_grad()
        loss.backward()
        with torch.no_grad():  # plain SGD; torch.optim would import dynamo (seconds per process)
            for p in head.parameters():
                p -= 0.05 * p.grad
        ebc.sparse_step()
        losses.append(loss.item())
        pause("step", step)
        if (step + 1) % CHECKPOINT_EVERY == 0:
            ebc.flush()
            pause("checkpoint", step)
            tmp = ckpt + ".tmp"
            torch.save({"step": step + 1, "losses": losses, "head": head.state_dict(),
                        "embeddings": ebc.checkpoint_state()}, tmp)
            os.replace(tmp, ckpt)
    final = {"losses": losses, "head": head.state_dict(),
             "rows": {t.name: ebc.table_rows(t.name) for t in tables}}
    torch.save(final, os.path.join(out_dir, "final.pt"))
    ebc.close()
    print("done", flush=True)


def _start(out_dir, pause_at=-1, pause_where="step") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", str(out_dir),
         "--pause-at", str(pause_at), "--pause-where", pause_where],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_line(proc: subprocess.Popen, expected: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited ({proc.wait()}) before {expected!r}: {proc.stderr.read()}")
        if line.strip() == expected:
            return
    proc.kill()
    raise AssertionError(f"worker did not print {expected!r} within {timeout_s}s")


def _run_to_end(out_dir) -> dict:
    # In this process (a process start costs seconds here): every object is built afresh
    # from the files on disk, exactly as a restarted trainer would.
    _worker(str(out_dir), pause_at=-1, pause_where="step")
    return torch.load(os.path.join(out_dir, "final.pt"), weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return _run_to_end(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize("pause_at,where", [(15, "step"), (17, "checkpoint"), (14, "undo")],
                         ids=["after-writebacks-past-checkpoint", "between-store-commit-and-checkpoint",
                              "inside-a-row-write"])
def test_sigkill_and_resume_reaches_the_uninterrupted_state(tmp_path, uninterrupted, pause_at, where):
    proc = _start(tmp_path, pause_at, where)
    _wait_line(proc, f"paused {where} {pause_at}")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "final.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 12  # the kill landed after the 2nd checkpoint, before the 3rd was saved

    resumed = _run_to_end(tmp_path)
    assert resumed["losses"] == uninterrupted["losses"]
    for name, value in uninterrupted["head"].items():
        assert torch.equal(resumed["head"][name], value), name
    for table, (weights, state) in uninterrupted["rows"].items():
        assert torch.equal(resumed["rows"][table][0], weights), table
        assert torch.equal(resumed["rows"][table][1], state), table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", required=True)
    parser.add_argument("--pause-at", type=int, default=-1)
    parser.add_argument("--pause-where", choices=["step", "checkpoint", "undo"], default="step")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    _worker(args.worker, args.pause_at, args.pause_where)
