"""The batch ramp ([trainer] batch_ramp_start / batch_ramp_samples, trainer.batch_ramp):
its schedule and defaults, and on a real LMDB cache: a chunk steps with its share of the
batch's loss, a run stopped mid-ramp resumes bitwise, and the placements train alike.

Data: test_model_kinds' cache (514 planted rows in 10 cached batches).
"""

from __future__ import annotations

import pytest
import torch

from engine.errors import ConfigError
from tests.trainer.test_model_kinds import cached, make_cfg, run_sharded_one_rank, scores  # noqa: F401 (a fixture)
from trainer.batch_ramp import DEFAULT_RAMP_SAMPLES, BatchRamp, chunk_bounds, ramp_for
from trainer.loop import ContinuousTrainer


def test_steps_double_after_each_stage_until_a_step_is_the_batch():
    ramp = BatchRamp(start=32, stage_samples=4096)
    got = [ramp.step_rows(s, 512) for s in (0, 4095, 4096, 8192, 12288, 16383, 16384, 10 ** 9)]
    assert got == [32, 32, 64, 128, 256, 256, 512, 512]
    assert ramp.step_rows(0, 20) == 20  # a batch smaller than the first step trains whole
    assert ramp.step_rows(0, 512, world_size=64) == 64  # every rank gets a row of each step
    assert BatchRamp(32, 0).step_rows(0, 512) == 512  # off
    with pytest.raises(ValueError, match="batch_ramp_start"):
        BatchRamp(0, 4096)
    with pytest.raises(ValueError, match="batch_ramp_samples"):
        BatchRamp(32, -1)


def test_a_batch_splits_into_steps_that_follow_the_schedule_row_by_row():
    ramp = BatchRamp(start=32, stage_samples=4096)
    # a stage boundary inside a batch takes effect there
    sizes = [b - a for a, b in chunk_bounds(ramp, 3840, 512)]
    assert sizes == [32] * 8 + [64] * 4
    # a GPU-sized batch ramps within itself: 128 steps of 32, 64 of 64, ... then the rest whole
    bounds = chunk_bounds(ramp, 0, 65536)
    assert len(bounds) == 257 and bounds[0] == (0, 32) and bounds[-1] == (40960, 65536)
    assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:]))
    assert chunk_bounds(ramp, 16384, 512) == [(0, 512)]  # the ramp is over
    # a remainder smaller than the world joins the step before it
    assert chunk_bounds(ramp, 0, 65, world_size=2)[-1] == (32, 65)
    with pytest.raises(ValueError):
        chunk_bounds(ramp, 0, 0)


def test_on_by_default_for_every_kind(cached):  # noqa: F811
    for kind in ("dlrm", "dcn_v2", "linear"):
        assert ramp_for(make_cfg(cached, kind, kind).train_spec()) == BatchRamp(4, DEFAULT_RAMP_SAMPLES), kind
    assert BatchRamp() == BatchRamp(4, DEFAULT_RAMP_SAMPLES)
    set_linear = make_cfg(cached, "l2", "linear", trainer={"batch_ramp_samples": 128, "batch_ramp_start": 8})
    assert ramp_for(set_linear.train_spec()) == BatchRamp(8, 128)
    assert ramp_for(make_cfg(cached, "off", trainer={"batch_ramp_samples": 0}).train_spec()).stage_samples == 0
    with pytest.raises(ConfigError, match="batch_ramp_start"):
        make_cfg(cached, "bad", trainer={"batch_ramp_start": 0})
    with pytest.raises(ConfigError, match="batch_ramp_samples"):
        make_cfg(cached, "bad", trainer={"batch_ramp_samples": -1})


def _state(trainer: ContinuousTrainer) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state (nested extra state included), by path."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value.detach().clone()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)

    for k, v in trainer.model.state_dict().items():
        walk(k, v)
    return out


def test_each_chunk_steps_with_its_share_of_the_batch(cached):  # noqa: F811
    """Batches of 64 split into steps of 16 (a ramp that never ends) train as batches of 16
    whose gradient is a quarter of their mean loss's: under SGD, batches of 16 at a quarter
    of the learning rate give the same model over the first 512 rows, and the same
    progressive metrics (each chunk scored before its own step, not before the batch's).
    With each chunk's own mean loss (the ramp before this rule) the chunked model would
    equal batches of 16 at the full rate, which this test tells apart."""
    sgd = {"optimizer": "sgd", "sparse_optimizer": "sgd", "warmup_steps": 0, "clip_grad_norm": 0.0}
    lr = 0.2
    model = {"kind": "dlrm", "wide": False}
    chunked = ContinuousTrainer(make_cfg(cached, "chunked", model=model, trainer={
        **sgd, "learning_rate": lr, "batch_size": 64, "batch_ramp_start": 16, "batch_ramp_samples": 10 ** 9}),
        max_batches=8)
    shared = ContinuousTrainer(make_cfg(cached, "shared", model=model, trainer={
        **sgd, "learning_rate": lr / 4, "batch_size": 16, "batch_ramp_samples": 0}), max_batches=32)
    full = ContinuousTrainer(make_cfg(cached, "full", model=model, trainer={
        **sgd, "learning_rate": lr, "batch_size": 16, "batch_ramp_samples": 0}), max_batches=32)
    got = {name: t.run() for name, t in (("chunked", chunked), ("shared", shared), ("full", full))}
    assert got["chunked"]["trained_samples"] == got["shared"]["trained_samples"] == 512
    a, b, c = _state(chunked), _state(shared), _state(full)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3
    for key in ("auc", "logloss"):
        assert got["chunked"][key] == pytest.approx(got["shared"][key], abs=1e-9)


def test_a_run_stopped_mid_ramp_resumes_bitwise(cached):  # noqa: F811
    """Steps of 16 for the first 128 rows, then 32, then whole batches of 64: stopped after
    3 batches (inside the ramp) and resumed, it ends bitwise where one run ends."""
    ramp = {"batch_ramp_start": 16, "batch_ramp_samples": 128}
    one = ContinuousTrainer(make_cfg(cached, "one", trainer=ramp))
    one.run()
    ContinuousTrainer(make_cfg(cached, "split", trainer=ramp), max_batches=3).run()
    resumed = ContinuousTrainer(make_cfg(cached, "split", trainer=ramp))
    resumed.run()
    assert resumed.total_samples == one.total_samples == 514
    a, b = _state(one), _state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics.summary() == one.metrics.summary()


def test_the_ramp_ends_alike_plain_row_cached_and_sharded(cached):  # noqa: F811
    """Steps of 16, then 32, then whole batches from the 256th row: the row cache and the
    sharded collection prefetch the next batch only when it trains whole, so the three
    placements train alike through the switch from chunked batches to whole ones."""
    ramp = {"batch_ramp_start": 16, "batch_ramp_samples": 128}
    plain = ContinuousTrainer(make_cfg(cached, "ramp-plain", trainer=ramp))
    ref = plain.run()
    ref_scores = scores(plain)
    rc = {"enabled": True, "path": str(cached / "ramp-rows"), "cache_rows": 36, "fsync": False}
    row_cached = ContinuousTrainer(make_cfg(cached, "ramp-rows", trainer=ramp, row_cache=rc))
    runs = {"row_cached": (row_cached.run(), scores(row_cached))}
    summary, probe, _ = run_sharded_one_rank(
        make_cfg(cached, "ramp-sharded", trainer=ramp, sharding={"enabled": True, "device": "cpu"}))
    runs["sharded"] = (summary, probe)
    for name, (summary, probe) in runs.items():
        assert summary["trained_samples"] == ref["trained_samples"] == 514, name
        assert summary["logloss"] == pytest.approx(ref["logloss"], abs=1e-6), name
        torch.testing.assert_close(probe, ref_scores, rtol=0, atol=1e-5, msg=name)
