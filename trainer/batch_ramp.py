"""Small steps at the start of training (``[trainer] batch_ramp_start``, ``batch_ramp_samples``).

A batch learner scores every row of a batch with the model from before the batch, so early
in a stream (a fresh model, every id new) a batch of 512 learns 512 rows late where an
online learner that updates after each event learns from the previous one. On short logs
that is the whole difference to online logistic regression (measured in
``bench/quality.py --events 10000``; README "Tuning").

So the first samples train in steps of ``start`` rows, doubling after every
``stage_samples`` samples until a step is the whole batch: with the defaults (4, 4096) the
ramp covers the first 28,672 samples of a 512-row batch in 2,033 steps instead of 56, then
costs nothing (a batch of 65,536 on a GPU: its first batch trains in 2,049 steps). The
loader's batches stay as they are: a batch is split into consecutive
chunks, each scored (progressive metrics) and trained on in order, as if the batches had
been that small, except that each chunk steps with its share of the batch's loss
(``ContinuousTrainer._train_batch``), so the Adagrad accumulators do not depend on the
ramp. The step size is a function of the samples trained so far
(checkpointed), so resume continues the ramp where it stood, and every rank of a
distributed job splits alike (each chunk is then sliced across the ranks like a batch).
"""

from __future__ import annotations

import dataclasses

__all__ = ["BatchRamp", "chunk_bounds", "ramp_for", "DEFAULT_RAMP_START", "DEFAULT_RAMP_SAMPLES"]

#: ``[trainer] batch_ramp_start``'s and ``batch_ramp_samples``'s defaults.
DEFAULT_RAMP_START = 4
DEFAULT_RAMP_SAMPLES = 4096


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    start: int = DEFAULT_RAMP_START
    stage_samples: int = DEFAULT_RAMP_SAMPLES  # 0 = off

    def __post_init__(self):
        if self.start < 1:
            raise ValueError(f"batch_ramp_start must be >= 1, got {self.start}")
        if self.stage_samples < 0:
            raise ValueError(f"batch_ramp_samples must be >= 0 (0 = off), got {self.stage_samples}")

    def step_rows(self, trained_samples: int, batch_rows: int, world_size: int = 1) -> int:
        """Rows per step for a batch of ``batch_rows`` that starts after ``trained_samples``
        samples: ``batch_rows`` once the ramp is over (or off); never below ``world_size``
        (every rank needs a row of each step)."""
        if self.stage_samples == 0:
            return batch_rows
        stage = trained_samples // self.stage_samples
        if stage >= 62 or self.start << stage >= batch_rows:
            return batch_rows
        return min(batch_rows, max(self.start << stage, world_size))


def ramp_for(spec) -> BatchRamp:
    """The ramp a ``TrainSpec`` asks for (``[trainer] batch_ramp_start``, ``batch_ramp_samples``)."""
    return BatchRamp(spec.trainer.batch_ramp_start, spec.trainer.batch_ramp_samples)


def chunk_bounds(ramp: BatchRamp, trained_samples: int, batch_rows: int, world_size: int = 1
                 ) -> list[tuple[int, int]]:
    """``[(start, end)]``: the consecutive steps a batch of ``batch_rows`` trains in when it
    starts after ``trained_samples`` samples; each step is ``step_rows`` of the samples
    trained before it, so a stage boundary inside a batch takes effect there. ``[(0,
    batch_rows)]`` once the ramp is over. A remainder shorter than ``world_size`` joins the
    step before it (every rank needs a row of each step)."""
    if batch_rows <= 0:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    bounds, at = [], 0
    while at < batch_rows:
        rows = ramp.step_rows(trained_samples + at, batch_rows, world_size)
        end = min(batch_rows, at + rows)
        if batch_rows - end < world_size:
            end = batch_rows
        bounds.append((at, end))
        at = end
    return bounds
