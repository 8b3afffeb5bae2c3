"""The figures of ``headrace report``, drawn with matplotlib's Agg canvas (no display, no
pyplot global state) from metrics history records (``trainer.history``).

Each ``*_figure`` function takes the records (oldest first) and returns a ``Figure``;
``save_png`` writes it. Lines break between trainer runs (a restart is a gap, not a jump
joined by a line) and each restart after the first is marked by a dashed vertical line. A
series the history never recorded (lag without ``serve``, say) is drawn as a note saying so,
so every figure shows what is known.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Sequence

try:
    from matplotlib import dates as mdates
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as exc:  # the `report` extra
    from engine.errors import ConfigError

    raise ConfigError(f"headrace report needs matplotlib, which is not installed ({exc}): "
                      "pip install 'headrace[report]' (or pip install matplotlib)") from None

__all__ = ["quality_figure", "freshness_figure", "throughput_figure", "ingest_figure",
           "dead_letters_figure", "save_png"]

Record = dict[str, Any]

_NAN = float("nan")


def _value(rec: Record, key: str) -> float:
    v = rec.get(key)
    return _NAN if v is None else float(v)


def _series(records: Sequence[Record], x_key: str, y_key: str) -> tuple[list[Any], list[float]]:
    """(x, y) with a NaN point between runs, so matplotlib breaks the line there."""
    xs: list[Any] = []
    ys: list[float] = []
    run = None
    for rec in records:
        if run is not None and rec.get("run") != run:
            xs.append(xs[-1])
            ys.append(_NAN)
        run = rec.get("run")
        xs.append(_x(rec, x_key))
        ys.append(_value(rec, y_key))
    return xs, ys


def _utc(unix_s: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(unix_s, _dt.timezone.utc)  # the page's times are UTC too


def _x(rec: Record, x_key: str) -> Any:
    if x_key == "unix_s":
        return _utc(rec["unix_s"])
    return _value(rec, x_key)


def _restarts(records: Sequence[Record], x_key: str) -> list[Any]:
    """x of the first record of every run after the first."""
    out, run = [], None
    for rec in records:
        if run is not None and rec.get("run") != run:
            out.append(_x(rec, x_key))
        run = rec.get("run")
    return out


def _known(ys: Sequence[float]) -> bool:
    return any(not math.isnan(y) for y in ys)


def _panel(ax, records: Sequence[Record], x_key: str, lines: Sequence[tuple[str, str]], ylabel: str,
           missing: str) -> None:
    drawn = False
    for key, label in lines:
        xs, ys = _series(records, x_key, key)
        if _known(ys):
            ax.plot(xs, ys, label=label, marker="." if len(xs) < 50 else None)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes, color="0.4")
    for x in _restarts(records, x_key):
        ax.axvline(x, color="0.5", linestyle="--", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn and len(lines) > 1:
        ax.legend(loc="best", fontsize="small")
    if x_key == "unix_s":
        times = [rec["unix_s"] for rec in records]
        if times and max(times) - min(times) < 60:  # else a lone point spans years of axis
            ax.set_xlim(_utc(min(times) - 30), _utc(max(times) + 30))
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=_dt.timezone.utc))
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("time (UTC)")


def _figure(rows: int, title: str) -> tuple[Figure, list]:
    fig = Figure(figsize=(9, 2.6 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(title)
    return fig, list(axes)


def quality_figure(records: Sequence[Record]) -> Figure:
    """AUC, logloss and calibration (lifetime and window) over the model's trained samples."""
    fig, (auc, loss, cal) = _figure(3, "Model quality (progressive: each sample scored before training on it)")
    _panel(auc, records, "samples", [("auc", "AUC"), ("window_auc", "window AUC")], "AUC", "no AUC yet")
    _panel(loss, records, "samples", [("logloss", "logloss"), ("window_logloss", "window logloss")],
           "logloss", "no logloss yet")
    _panel(cal, records, "samples", [("calibration", "calibration"), ("window_calibration", "window calibration")],
           "pred / label", "no calibration yet (no positive labels)")
    cal.axhline(1.0, color="0.3", linewidth=0.6)
    cal.set_xlabel("trained samples (dashed: trainer restarts)")
    return fig


def freshness_figure(records: Sequence[Record]) -> Figure:
    """Freshness p50/p99 (time trained minus event time) over wall time."""
    fig, (ax,) = _figure(1, "Freshness: time trained minus event time, over the last metrics_window rows")
    _panel(ax, records, "unix_s", [("freshness_p50_s", "p50"), ("freshness_p99_s", "p99")], "seconds",
           "no freshness recorded (batches without event times)")
    return fig


def throughput_figure(records: Sequence[Record]) -> Figure:
    """Trained samples/s and the share of time waiting for data, over wall time."""
    fig, (rate, wait) = _figure(2, "Trainer throughput")
    _panel(rate, records, "unix_s", [("samples_per_s", "samples/s")], "samples/s", "no throughput recorded")
    _panel(wait, records, "unix_s", [("data_wait_fraction", "data wait")], "data wait share",
           "no data-wait figure recorded")
    return fig


def ingest_figure(records: Sequence[Record]) -> Figure:
    """Events read into the cache per second, and the consumer lag, over wall time."""
    fig, (rate, lag) = _figure(2, "Ingest")
    _panel(rate, records, "unix_s", [("ingest_events_per_s", "events/s into the cache")], "events/s",
           "no ingest rate recorded")
    _panel(lag, records, "unix_s", [("lag", "consumer lag")], "events",
           "no lag recorded (serve measures it; train alone does not)")
    return fig


def dead_letters_figure(by_reason: dict[str, int] | None) -> Figure:
    """Dead letters by reason code (the cache's lifetime counts)."""
    fig, (ax,) = _figure(1, "Dead letters by reason (cache lifetime)")
    if not by_reason:
        ax.text(0.5, 0.5, "no dead letters" if by_reason is not None else "no cache to read counts from",
                ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_yticks([])
        return fig
    reasons = sorted(by_reason, key=lambda r: by_reason[r])
    ax.barh(reasons, [by_reason[r] for r in reasons], color="tab:red")
    for i, r in enumerate(reasons):
        ax.text(by_reason[r], i, f" {by_reason[r]:,}", va="center", fontsize="small")
    ax.set_xlabel("dead letters")
    return fig


def save_png(fig: Figure, path: str) -> None:
    fig.savefig(path, format="png", dpi=100)
