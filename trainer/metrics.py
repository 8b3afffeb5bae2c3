"""Progressive validation metrics: every batch is scored before the model trains on it.

``ProgressiveMetrics.update(logits, labels)`` takes the scores the model gave a batch *before*
its train step, so every sample is an unseen sample when it is scored, and the running metrics
estimate generalisation without a held-out set (the usual practice for online CTR models).

Tracked overall (since the start, or since the checkpoint these metrics were restored from)
and over the most recent ``window_samples`` samples:

- logloss: mean binary cross-entropy of the logits (numerically stable, soft labels allowed);
- AUC: probability that a random positive scores above a random negative (ties count 1/2);
  a label counts as positive when > 0.5;
- calibration: mean prediction / mean label (1.0 is calibrated; None without positives).

Window AUC is exact (rank-based with average ranks for ties) over the ring buffer. Overall AUC
uses bounded memory: per-class histograms of predicted probabilities over ``auc_bins`` equal
bins of [0, 1] (``2 * auc_bins`` int64 counters, 1 MiB at the default 65536 bins). Pairs whose
scores fall in different bins are ordered exactly; a positive/negative pair in the same bin is
counted 1/2, whereas the exact AUC counts it 0, 1/2 or 1. So
``|auc - exact_auc| <= 0.5 * sum_b pos_b * neg_b / (P * N)``; ``summary()`` reports this
bound as ``auc_error_bound``, computed from the state (it is 0 when no bin holds both classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["ProgressiveMetrics", "exact_auc"]


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Exact ROC AUC via the Mann-Whitney statistic with average ranks for tied scores.
    ``labels`` > 0.5 are positives. None when either class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(labels) > 0.5
    n_pos = int(pos.sum())
    n_neg = int(pos.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores)  # ties get their group's average rank: no stable sort needed
    sorted_scores = scores[order]
    # Average rank (1-based) of each group of equal scores (one pass over the sorted scores).
    first = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    counts = np.diff(np.r_[first, sorted_scores.size])
    avg_rank_of_group = first + (counts + 1) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank_of_group, counts)
    rank_sum_pos = float(ranks[pos].sum())
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _logloss_per_sample(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # BCE-with-logits: max(x, 0) - x*y + log(1 + exp(-|x|)), stable for any logit.
    x = logits.astype(np.float64)
    y = labels.astype(np.float64)
    return np.maximum(x, 0.0) - x * y + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


class ProgressiveMetrics:
    """Running logloss / AUC / calibration, overall and over a window of recent samples.

    Not thread-safe; the training loop owns it. ``state_dict()`` / ``load_state_dict()`` round
    trip everything (counters, histograms, the window ring buffer) as tensors, so metrics
    resumed from a checkpoint continue exactly as if never interrupted.
    """

    def __init__(self, window_samples: int = 50_000, auc_bins: int = 65_536):
        if window_samples < 1:
            raise ValueError(f"window_samples must be >= 1, got {window_samples}")
        if auc_bins < 2:
            raise ValueError(f"auc_bins must be >= 2, got {auc_bins}")
        self.window_samples = int(window_samples)
        self.auc_bins = int(auc_bins)
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.loss_sum = 0.0
        self.pred_sum = 0.0
        self.label_sum = 0.0
        self.hist_pos = np.zeros(self.auc_bins, dtype=np.int64)
        self.hist_neg = np.zeros(self.auc_bins, dtype=np.int64)
        self._win_logit = np.zeros(self.window_samples, dtype=np.float32)
        self._win_label = np.zeros(self.window_samples, dtype=np.float32)
        self._win_next = 0  # ring position the next sample goes to
        self._win_filled = 0

    def update(self, logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Add one scored batch (logits from *before* training on it)."""
        x = _to_numpy(logits).reshape(-1).astype(np.float32, copy=False)
        y = _to_numpy(labels).reshape(-1).astype(np.float32, copy=False)
        if x.shape != y.shape:
            raise ValueError(f"logits {x.shape} and labels {y.shape} differ in length")
        n = x.size
        if n == 0:
            return
        p = _sigmoid(x)
        self.samples += n
        self.loss_sum += float(_logloss_per_sample(x, y).sum())
        self.pred_sum += float(p.sum())
        self.label_sum += float(y.astype(np.float64).sum())
        bins = np.minimum((p * self.auc_bins).astype(np.int64), self.auc_bins - 1)
        pos = y > 0.5
        self.hist_pos += np.bincount(bins[pos], minlength=self.auc_bins)
        self.hist_neg += np.bincount(bins[~pos], minlength=self.auc_bins)
        self._window_add(x, y)

    def _window_add(self, x: np.ndarray, y: np.ndarray) -> None:
        w = self.window_samples
        if x.size >= w:
            x, y = x[-w:], y[-w:]
        n = x.size
        first = min(n, w - self._win_next)
        self._win_logit[self._win_next:self._win_next + first] = x[:first]
        self._win_label[self._win_next:self._win_next + first] = y[:first]
        rest = n - first
        if rest:
            self._win_logit[:rest] = x[first:]
            self._win_label[:rest] = y[first:]
        self._win_next = (self._win_next + n) % w
        self._win_filled = min(w, self._win_filled + n)

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        """The window's (logits, labels), oldest first (copies)."""
        if self._win_filled < self.window_samples:
            return self._win_logit[:self._win_filled].copy(), self._win_label[:self._win_filled].copy()
        idx = np.r_[self._win_next:self.window_samples, 0:self._win_next]
        return self._win_logit[idx], self._win_label[idx]

    def histogram_auc(self) -> tuple[float | None, float | None]:
        """(overall AUC from the histograms, its error bound); (None, None) without both classes."""
        n_pos = int(self.hist_pos.sum())
        n_neg = int(self.hist_neg.sum())
        if n_pos == 0 or n_neg == 0:
            return None, None
        pos = self.hist_pos.astype(np.float64)
        neg = self.hist_neg.astype(np.float64)
        neg_below = np.cumsum(neg) - neg
        same_bin = pos * neg
        auc = float((pos * neg_below).sum() + 0.5 * same_bin.sum()) / (n_pos * n_neg)
        bound = float(0.5 * same_bin.sum() / (n_pos * n_neg))
        return auc, bound

    def summary(self) -> dict[str, Any]:
        """Plain-JSON dict of the current metrics; undefined values are None."""
        auc, bound = self.histogram_auc()
        wx, wy = self.window()
        out: dict[str, Any] = {
            "samples": self.samples,
            "logloss": self.loss_sum / self.samples if self.samples else None,
            "auc": auc,
            "auc_error_bound": bound,
            "mean_prediction": self.pred_sum / self.samples if self.samples else None,
            "mean_label": self.label_sum / self.samples if self.samples else None,
            "calibration": (self.pred_sum / self.label_sum) if self.label_sum > 0 else None,
            "window_samples": int(wx.size),
        }
        if wx.size:
            wp = _sigmoid(wx)
            label_sum = float(wy.astype(np.float64).sum())
            out["window_logloss"] = float(_logloss_per_sample(wx, wy).mean())
            out["window_auc"] = exact_auc(wx, wy)
            out["window_calibration"] = float(wp.sum()) / label_sum if label_sum > 0 else None
        else:
            out["window_logloss"] = out["window_auc"] = out["window_calibration"] = None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "window_samples": self.window_samples,
            "auc_bins": self.auc_bins,
            "samples": self.samples,
            "loss_sum": self.loss_sum,
            "pred_sum": self.pred_sum,
            "label_sum": self.label_sum,
            "hist_pos": torch.from_numpy(self.hist_pos.copy()),
            "hist_neg": torch.from_numpy(self.hist_neg.copy()),
            "win_logit": torch.from_numpy(self._win_logit.copy()),
            "win_label": torch.from_numpy(self._win_label.copy()),
            "win_next": self._win_next,
            "win_filled": self._win_filled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``. The window size and bin count must match this
        instance's (they come from config); a mismatch raises ValueError naming both."""
        for key, mine in (("window_samples", self.window_samples), ("auc_bins", self.auc_bins)):
            if int(state[key]) != mine:
                raise ValueError(f"metrics state has {key}={state[key]}, this instance {mine}")
        self.samples = int(state["samples"])
        self.loss_sum = float(state["loss_sum"])
        self.pred_sum = float(state["pred_sum"])
        self.label_sum = float(state["label_sum"])
        self.hist_pos = state["hist_pos"].numpy().astype(np.int64, copy=True)
        self.hist_neg = state["hist_neg"].numpy().astype(np.int64, copy=True)
        self._win_logit = state["win_logit"].numpy().astype(np.float32, copy=True)
        self._win_label = state["win_label"].numpy().astype(np.float32, copy=True)
        self._win_next = int(state["win_next"])
        self._win_filled = int(state["win_filled"])


def _to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float32).numpy()
    return np.asarray(t)
