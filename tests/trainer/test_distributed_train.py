"""``headrace train`` under ``torchrun`` (2 gloo ranks on CPU) trains the sharded model from the
cache exactly like one plain process, and its sharded checkpoints resume across world sizes.

Every run is the real CLI in a subprocess: ``python -m torch.distributed.run --standalone
--nproc-per-node 2 -m engine train -c C --json`` (``--standalone``: a c10d rendezvous on an
OS-chosen localhost port) or ``python -m engine train -c C --json`` for one process.

References: one plain process (``[sharding]`` off: every table in one fused collection,
row-wise Adagrad), and one process with the same config and seed (a one-rank plan) whose
checkpoints the resume tests compare against. Tolerances: the ranks' all-to-all, DDP
all-reduce and the column shards' sums of squares only reorder fp32 sums, so metrics agree
to 1e-5 and trained tables and optimizer state to 1e-4 (measured differences ~1e-7).

Resume: a cache holding the first half of the data (a whole number of training batches) is
trained to its end (checkpoint), the second half is appended, and the job resumes on the
other world size; the result must match the uninterrupted one-process run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
import torch

from engine.config import load_config
from engine.errors import CheckpointError
from storage.batch_cache import BatchCache
from tests.engine_helpers import write_config
from trainer.checkpoint import CheckpointManager, ShardedCheckpointManager
from trainer.metrics import ProgressiveMetrics
from transforms.elements import ProcessedBatch

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAP_BYTES = 1 << 26
RUN_TIMEOUT_S = 120
POLL_S = 0.05
BATCH = 63  # odd: the two ranks get unequal slices (32 + 31 rows)
# cached batch sizes; the first FIRST_HALF of them hold 4 whole training batches (252 rows)
SIZES = [50, 50, 50, 50, 52, 60, 70, 40, 50, 42]
FIRST_HALF = 5
TABLES = {"u": 40, "tags": 12, "c": 20}
# one table per kind of placement the 2-rank plan can make on CPU
FORCED = {"u": "row_wise", "tags": "table_wise", "c": "column_wise"}
METRIC_TOL = 1e-5
TABLE_TOL = 1e-4


def planted_rows(n: int, start: int) -> pa.RecordBatch:
    """Rows whose click logit depends on x1 and on u's row (a learnable signal)."""
    rng = np.random.default_rng([7, start])
    u = rng.integers(0, TABLES["u"], n)
    c = rng.integers(0, TABLES["c"], n)
    x1 = rng.normal(0, 1, n).astype(np.float32)
    x2 = rng.normal(0, 1, n).astype(np.float32)
    logit = 1.2 * x1 + np.where(u % 2 == 0, 1.5, -1.5)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    tags = [list(rng.integers(0, TABLES["tags"], int(k))) for k in rng.integers(0, 4, n)]
    offsets = np.arange(start, start + n, dtype=np.int64)
    return pa.record_batch({
        "label": pa.array(labels), "x1": pa.array(x1), "x2": pa.array(x2),
        "u": pa.array(u.astype(np.int64)), "tags": pa.array(tags, pa.list_(pa.int64())),
        "c": pa.array(c.astype(np.int64)),
        "u.id": pa.array(u.astype(np.int64)), "c.id": pa.array(c.astype(np.int64)),
        "_offset": pa.array(offsets), "_event_time_ms": pa.array(offsets * 10),
    })


def fill_cache(path: Path, first: int, last: int, *, total_rows: int | None = None) -> None:
    """Append cached batches ``SIZES[first:last]`` (offsets continue where they left off),
    cut short so that the cache holds ``total_rows`` rows when given."""
    with BatchCache(path, map_size_bytes=MAP_BYTES) as cache:
        off = sum(SIZES[:first])
        for n in SIZES[first:last]:
            rows = planted_rows(n, off)
            if total_rows is not None:
                n = min(n, total_rows - off)
                rows = rows.slice(0, n)
            cache.write(ProcessedBatch("events", 0, off, off + n, 0, rows, (),
                                       np.empty(0, np.int64), read=n, mapping_version=0))
            off += n


def config(tmp_path: Path, name: str, cache: Path, ranks: int, *, sharded: bool = True) -> Path:
    """The job's config; ``name`` names its checkpoint directory. Forced sharding types are
    per world size (row- and column-wise need 2+ ranks), so one rank lets the planner choose:
    resuming across the two layouts is the resharding under test. ``sharded=False``: the
    plain trainer (one process)."""
    doc = {
        "schema": {"label": "label"},
        "cache": {"path": str(cache), "map_size_bytes": MAP_BYTES},
        "trainer": {"embedding_dim": 8, "bottom_mlp": [8, 8], "top_mlp": [8], "batch_size": BATCH,
                    "learning_rate": 0.1, "sparse_optimizer": "rowwise_adagrad",
                    "dense_optimizer": "adagrad", "seed": 5,
                    "checkpoint_dir": str(tmp_path / f"{name}-ckpt"), "checkpoint_every_batches": 4,
                    "metrics_window": 1000, "prefetch_batches": 2, "device": "cpu", "threads": 1,
                    "warmup_steps": 0},
        "sharding": {"enabled": sharded, "device": "cpu", "tables": FORCED if ranks > 1 else {}},
        # the model of before [model] (trained_state reads its tables and parameters; warmup
        # would spend these few batches): tests/trainer/test_model_kinds_gloo.py trains the
        # first-order tables and the dense normaliser on two ranks
        "model": {"wide": False, "normalize_dense": False},
    }
    path = write_config(tmp_path, doc, name=f"{name}-{ranks}.toml")
    # arrays of tables are beyond the helper's tiny TOML writer
    features = "".join(f'\n[[schema.dense]]\nname = "{d}"\n' for d in ("x1", "x2"))
    features += "".join(
        f'\n[[schema.sparse]]\nname = "{n}"\nrows = {r}\n' + ("multi = true\n" if n == "tags" else "")
        for n, r in TABLES.items())
    path.write_text(path.read_text() + features)
    return path


def start(cfg: Path, ranks: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable]
    if ranks > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd += ["-m", "engine", "train", "-c", str(cfg), "--json", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, ok_codes: tuple[int, ...] = (0,)) -> dict:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode in ok_codes, f"exit {proc.returncode}\n{err.decode()[-4000:]}"
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    assert len(lines) == 1, f"expected one JSON summary (rank 0 only), got {len(lines)}:\n{out.decode()}"
    return orjson.loads(lines[0])


def run_all(*jobs: tuple[Path, int]) -> list[dict]:
    """Start the jobs together (they use separate caches/checkpoints), then collect them."""
    procs = [start(cfg, ranks) for cfg, ranks in jobs]
    return [finish(p) for p in procs]


def trained_state(checkpoint: str) -> dict[str, torch.Tensor]:
    """Whole tables, their sparse optimizer state and the dense parameters of a sharded
    checkpoint directory, reassembled from the pieces every rank saved (so the test needs no
    process group), or of a plain checkpoint file (the fused buffers, split by table)."""
    ckpt = Path(checkpoint)
    if ckpt.is_file():
        return plain_state(ckpt)
    manifest = orjson.loads((ckpt / "manifest.json").read_bytes())
    tables = {t["name"]: torch.full((t["rows"], t["dim"]), float("nan")) for t in manifest["plan"]["tables"]}
    states: dict[str, torch.Tensor] = {}
    for f in manifest["files"]:
        for piece in torch.load(ckpt / f, weights_only=True)["pieces"]:
            (r0, r1), (c0, c1) = piece["rows"], piece["cols"]
            tables[piece["table"]][r0:r1, c0:c1] = piece["weight"]
            for key, value in piece["state"].items():
                table = tables[piece["table"]]
                shape = table.shape[:1] if value.dim() == 1 else table.shape
                full = states.setdefault(f"{key}.{piece['table']}", torch.full(shape, float("nan")))
                if value.dim() == 1:  # one value per row (row-wise Adagrad)
                    full[r0:r1] = value
                else:
                    full[r0:r1, c0:c1] = value
    for name, t in {**tables, **states}.items():
        assert not torch.isnan(t).any(), f"{name} not fully covered by {ckpt}"
    dense = torch.load(ckpt / "dense.pt", weights_only=True)
    return {**{f"table.{k}": v for k, v in tables.items()}, **states, **dense["params"]}


def plain_state(path: Path) -> dict[str, torch.Tensor]:
    """``trained_state`` of a plain checkpoint: the fused collection's buffer and state split
    by table (its extra state lists the tables in buffer order), and the dense parameters."""
    model = torch.load(path, weights_only=True)["model"]
    out = {k: v for k, v in model.items() if not k.startswith("embeddings.")}
    start = 0
    for name, rows, _dim in model["embeddings._extra_state"]["tables"]:
        out[f"table.{name}"] = model["embeddings.weights"][start:start + rows].float()
        out[f"state_sum.{name}"] = model["embeddings.state_sum"][start:start + rows]
        start += rows
    return out


METRICS = ("logloss", "auc", "window_logloss", "window_auc", "mean_prediction")


def assert_same_state(checkpoint: str, ref_checkpoint: str) -> None:
    a, b = trained_state(checkpoint), trained_state(ref_checkpoint)
    assert a.keys() == b.keys()
    assert any(k.startswith("state_sum.") for k in a)  # the sparse optimizer's state is compared too
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= TABLE_TOL, f"{name} differs by {diff}"


def assert_same_training(got: dict, ref: dict, *, samples: int) -> None:
    assert got["total_trained_samples"] == ref["total_trained_samples"] == samples
    assert got["skipped_rows"] == 0
    for key in METRICS:
        assert got[key] == pytest.approx(ref[key], abs=METRIC_TOL), key
    assert_same_state(got["checkpoint"], ref["checkpoint"])


def checkpointed_metrics(checkpoint: Path) -> dict:
    """The progressive metrics a sharded checkpoint holds (as a run summary reports them)."""
    extra = torch.load(checkpoint / "dense.pt", weights_only=True)["extra"]
    metrics = ProgressiveMetrics(1000)
    metrics.load_state_dict(extra["metrics"])
    return {**metrics.summary(), "total_trained_samples": extra["counters"]["trained_samples"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    total = sum(SIZES)
    fill_cache(tmp / "full", 0, len(SIZES))
    # 8 whole batches and a 1-row tail: fewer rows than ranks, so both ranks skip it
    fill_cache(tmp / "tiny_tail", 0, len(SIZES), total_rows=8 * BATCH + 1)
    fill_cache(tmp / "half2", 0, FIRST_HALF)  # 2 ranks first, then 1 process
    fill_cache(tmp / "half1", 0, FIRST_HALF)  # 1 process first, then 2 ranks

    def cfg(name: str, cache: str, ranks: int) -> tuple[Path, int]:
        return config(tmp, name, tmp / cache, ranks), ranks

    one, two, a_first, b_first = run_all(cfg("one", "full", 1), cfg("two", "tiny_tail", 2),
                                         cfg("a", "half2", 2), cfg("b", "half1", 1))
    fill_cache(tmp / "half2", FIRST_HALF, len(SIZES))
    fill_cache(tmp / "half1", FIRST_HALF, len(SIZES))
    plain_cfg = (config(tmp, "plain", tmp / "full", 1, sharded=False), 1)
    a_rest, b_rest, plain = run_all(cfg("a", "half2", 1), cfg("b", "half1", 2), plain_cfg)
    return {"total": total, "one": one, "two": two, "a_first": a_first, "a_rest": a_rest,
            "b_first": b_first, "b_rest": b_rest, "plain": plain}


def test_one_rank_plan_matches_plain_training(runs):
    """The reference itself: a one-rank sharded run equals the plain trainer (fused tables,
    row-wise Adagrad) on the whole cache, metrics, tables and accumulators alike."""
    one, plain = runs["one"], runs["plain"]
    assert "world_size" not in plain and plain["checkpoint"].endswith(".pt")
    assert plain["stop_reason"] == one["stop_reason"] == "end_of_cache"
    assert_same_training(one, plain, samples=runs["total"])


def test_two_ranks_match_one_process(runs):
    """The 2-rank run on the first 8 batches (then a 1-row tail it skips) against the
    reference's checkpoint after the same 8 batches: metrics and every parameter; and
    against the plain trainer's checkpoint after those 8 batches."""
    one, two = runs["one"], runs["two"]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["plan"] == FORCED
    assert two["stop_reason"] == "end_of_cache" and two["trained_batches"] == 8
    assert two["skipped_rows"] == 1 and two["cursor"]["seq"] == len(SIZES) - 1  # read past it
    assert one["auc"] > 0.6  # it learned the planted signal: the comparison is not of noise
    ref_checkpoint = Path(one["checkpoint"]).with_name("sharded-000000000008")
    ref = checkpointed_metrics(ref_checkpoint)
    assert two["total_trained_samples"] == ref["total_trained_samples"] == 8 * BATCH
    for key in METRICS:
        assert two[key] == pytest.approx(ref[key], abs=METRIC_TOL), key
    assert_same_state(two["checkpoint"], str(ref_checkpoint))
    assert_same_state(two["checkpoint"], str(Path(runs["plain"]["checkpoint"]).with_name("ckpt-000000000008.pt")))


@pytest.mark.parametrize("chain", ["a", "b"], ids=["2-ranks-then-1", "1-then-2-ranks"])
def test_resume_on_another_world_size(runs, chain):
    first, rest = runs[f"{chain}_first"], runs[f"{chain}_rest"]
    assert first["trained_samples"] == 4 * BATCH and first["world_size"] == (2 if chain == "a" else 1)
    assert rest["world_size"] == (1 if chain == "a" else 2)
    assert rest["resumed_from"] == first["checkpoint"]
    assert first["trained_samples"] + rest["trained_samples"] == runs["total"]
    assert_same_training(rest, runs["one"], samples=runs["total"])


def test_follow_job_stops_together_on_sigterm_and_resumes(runs, tmp_path):
    """SIGTERM to torchrun (forwarded to both ranks) stops a --follow job at the same batch on
    both ranks with a checkpoint; a one-process resume then ends where the reference did."""
    fill_cache(tmp_path / "cache", 0, len(SIZES))
    two, one = config(tmp_path, "f", tmp_path / "cache", 2), config(tmp_path, "f", tmp_path / "cache", 1)
    proc = start(two, 2, "--follow")
    first_checkpoint = tmp_path / "f-ckpt" / "sharded-000000000004"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not first_checkpoint.exists():  # the job is training (a checkpoint every 4 batches)
        assert proc.poll() is None, proc.communicate()[1].decode()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint from the --follow job"
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGTERM)
    # torchrun itself exits 1 after a signal (its SignalException); the ranks exit cleanly
    stopped = finish(proc, ok_codes=(0, 1))
    assert stopped["stop_reason"] == "stopped" and stopped["world_size"] == 2
    assert stopped["trained_batches"] >= 4
    assert stopped["checkpoint"].endswith(f"sharded-{stopped['trained_batches']:012d}")
    rest = finish(start(one, 1))
    assert rest["resumed_from"] == stopped["checkpoint"]
    assert_same_training(rest, runs["one"], samples=runs["total"])


def test_checkpoint_kinds_never_mix(tmp_path):
    """A sharded trainer refuses a directory of plain checkpoints and vice versa, before
    touching any model (so no process group is needed here)."""
    cfg = load_config(config(tmp_path, "mix", tmp_path / "cache", 1))
    plain_dir, sharded_dir = tmp_path / "plain", tmp_path / "sharded"
    plain_dir.mkdir()
    (plain_dir / "ckpt-000000000004.pt").write_bytes(b"")
    (sharded_dir / "sharded-000000000004").mkdir(parents=True)
    (sharded_dir / "sharded-000000000004" / "manifest.json").write_text("{}")
    metrics = ProgressiveMetrics(cfg.trainer.metrics_window)
    with pytest.raises(CheckpointError, match=r"plain checkpoints.*\[sharding\] is enabled"):
        ShardedCheckpointManager(plain_dir, cfg, rank=0).load(None, None, metrics)
    with pytest.raises(CheckpointError, match=r"sharded checkpoints.*enabled = true"):
        CheckpointManager(sharded_dir, cfg).load(None, None, metrics)


def test_sharded_manager_removes_torn_saves(tmp_path):
    """Leftovers of a crash mid-save (a temp directory, a directory without manifest) are
    removed by rank 0 on start; complete checkpoints are kept and found."""
    cfg = load_config(config(tmp_path, "torn", tmp_path / "cache", 1))
    d = tmp_path / "ck"
    for name in (".sharded-000000000009.tmp", "sharded-000000000008", "sharded-000000000005"):
        (d / name).mkdir(parents=True)
    (d / "sharded-000000000005" / "manifest.json").write_text("{}")
    ShardedCheckpointManager(d, cfg, rank=1)  # not rank 0: touches nothing
    assert len(list(d.iterdir())) == 3
    manager = ShardedCheckpointManager(d, cfg, rank=0)
    assert sorted(p.name for p in d.iterdir()) == ["sharded-000000000005"]
    assert manager.latest() == d / "sharded-000000000005"
