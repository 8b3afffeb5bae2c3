"""``headrace report``: PNG plots and an ``index.html`` of a model's whole life, from its
metrics history (``trainer.history``, beside the checkpoints; it survives restarts) and the
cache's dead-letter counts.

Writes into ``out_dir`` (default ``<checkpoint_dir>/report``): ``quality.png`` (AUC, logloss,
calibration over trained samples), ``freshness.png``, ``throughput.png`` (samples/s, data
wait), ``ingest.png`` (ingest rate, lag) over time, ``dead_letters.png`` (by reason) and
``index.html`` showing them with the headline numbers, the trainer runs and the config.
Returns the paths and the headline numbers (``--json`` prints them).

Example::

    headrace report -c service.toml --out /tmp/report --json
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import os
import statistics
from typing import Any

from engine.config import HeadraceConfig
from engine.errors import CacheError
from storage.metrics_history import read_history
from trainer.history import history_path

__all__ = ["report", "RunSpan", "run_spans", "headline"]

#: (file stem, section title, what it shows) in page order.
PLOTS: tuple[tuple[str, str, str], ...] = (
    ("quality", "Model quality", "Progressive AUC, logloss and calibration over the model's trained samples."),
    ("freshness", "Freshness", "Time trained minus event time (p50, p99) over wall time."),
    ("throughput", "Trainer throughput", "Trained samples per second and the share of time waiting for data."),
    ("ingest", "Ingest", "Events read into the cache per second, and the consumer lag."),
    ("dead_letters", "Dead letters", "Dead letters by reason code over the cache's life."),
)


@dataclasses.dataclass(frozen=True)
class RunSpan:
    """One trainer run (process) in the history: its records' first and last time and samples."""

    run: str
    records: int
    first_unix_s: float
    last_unix_s: float
    first_samples: int | None
    last_samples: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_spans(records: list[dict[str, Any]]) -> list[RunSpan]:
    """Consecutive records of the same ``run``, in history order."""
    spans: list[list[dict[str, Any]]] = []
    for rec in records:
        if spans and spans[-1][0].get("run") == rec.get("run"):
            spans[-1].append(rec)
        else:
            spans.append([rec])
    return [RunSpan(str(s[0].get("run")), len(s), s[0]["unix_s"], s[-1]["unix_s"], s[0].get("samples"),
                    s[-1].get("samples")) for s in spans]


def _last(records: list[dict[str, Any]], key: str) -> Any:
    for rec in reversed(records):
        if rec.get(key) is not None:
            return rec[key]
    return None


def _median(records: list[dict[str, Any]], key: str) -> float | None:
    values = [rec[key] for rec in records if rec.get(key) is not None]
    return statistics.median(values) if values else None


def headline(records: list[dict[str, Any]], dead_by_reason: dict[str, int] | None) -> dict[str, Any]:
    """The numbers at the top of the page: the latest of each metric, medians of the rates."""
    out: dict[str, Any] = {key: _last(records, key) for key in (
        "samples", "auc", "logloss", "calibration", "window_auc", "window_logloss", "window_calibration",
        "freshness_p50_s", "freshness_p99_s", "lag", "mapping_version", "row_cache_hit_rate")}
    out["trained_samples"] = out.pop("samples")
    out["median_samples_per_s"] = _median(records, "samples_per_s")
    out["median_ingest_events_per_s"] = _median(records, "ingest_events_per_s")
    out["first_unix_s"] = records[0]["unix_s"] if records else None
    out["last_unix_s"] = records[-1]["unix_s"] if records else None
    out["dead_letters_by_reason"] = dead_by_reason
    out["dead_letters"] = sum(dead_by_reason.values()) if dead_by_reason is not None else None
    return out


def _cache_dead_letters(cfg: HeadraceConfig) -> tuple[dict[str, int] | None, str | None]:
    """(dead letters by reason, why not) from the cache's counters."""
    if not os.path.isdir(cfg.cache.path):
        return None, f"no cache at {cfg.cache.path}"
    from storage.batch_cache import BatchCache

    try:
        with BatchCache.from_config(cfg.cache, readonly=True) as cache:
            return dict(cache.stat()["dead_letters"]), None
    except CacheError as exc:
        return None, f"cache not readable: {exc}"


def report(cfg: HeadraceConfig, *, config_path: str | None = None, out_dir: str | None = None) -> dict[str, Any]:
    """Draw the report (see the module docstring); returns ``{"out_dir", "index_html",
    "plots": {stem: path}, "history", "records", "runs", "run_spans", "skipped_lines", ...headline}``.
    No history yet is a ``HistoryError`` (exit code 4); without matplotlib, a ``ConfigError``
    naming the ``report`` extra."""
    path = history_path(cfg)
    hist = read_history(path)  # before matplotlib: no history is the first thing to say

    from engine import report_plots as plots

    records = [r for r in hist.records if isinstance(r.get("unix_s"), (int, float))]  # in write order
    skipped = hist.skipped_lines + len(hist.records) - len(records)
    out_dir = out_dir or os.path.join(cfg.trainer.checkpoint_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    dead, dead_note = _cache_dead_letters(cfg)
    figures = {
        "quality": plots.quality_figure(records),
        "freshness": plots.freshness_figure(records),
        "throughput": plots.throughput_figure(records),
        "ingest": plots.ingest_figure(records),
        "dead_letters": plots.dead_letters_figure(dead),
    }
    paths = {}
    for stem, fig in figures.items():
        paths[stem] = os.path.join(out_dir, f"{stem}.png")
        plots.save_png(fig, paths[stem])
    spans = run_spans(records)
    head = headline(records, dead)
    index = os.path.join(out_dir, "index.html")
    config_text = None
    if config_path:
        with open(config_path, encoding="utf-8") as fh:
            config_text = fh.read()
    page = _page(head, spans, path, skipped, dead_note, config_path, config_text)
    with open(index, "w", encoding="utf-8") as fh:
        fh.write(page)
    return {"out_dir": os.path.abspath(out_dir), "index_html": os.path.abspath(index),
            "plots": {k: os.path.abspath(v) for k, v in paths.items()}, "history": os.path.abspath(path),
            "records": len(records), "runs": len(spans), "run_spans": [r.to_dict() for r in spans],
            "skipped_lines": skipped, **head}


def _when(unix_s: float | None) -> str:
    if unix_s is None:
        return "-"
    return _dt.datetime.fromtimestamp(unix_s, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v:,}" for k, v in sorted(value.items())) or "none"
    return str(value)


def _page(head: dict[str, Any], spans: list[RunSpan], history: str, skipped: int, dead_note: str | None,
          config_path: str | None, config_text: str | None) -> str:
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_when(v) if k.endswith('unix_s') else _cell(v))}</td></tr>"
                   for k, v in head.items())
    runs = "".join(
        f"<tr><td>{i + 1}</td><td>{esc(_when(s.first_unix_s))}</td><td>{esc(_when(s.last_unix_s))}</td>"
        f"<td>{esc(_cell(s.first_samples))}</td><td>{esc(_cell(s.last_samples))}</td><td>{s.records}</td></tr>"
        for i, s in enumerate(spans))
    notes = []
    if skipped:
        notes.append(f"{skipped} history line(s) skipped (torn by a crash, or not a record).")
    if dead_note:
        notes.append(f"Dead letters: {dead_note}.")
    sections = "".join(f'<h2>{esc(title)}</h2><p>{esc(what)}</p><img src="{stem}.png" alt="{esc(title)}">'
                       for stem, title, what in PLOTS)
    config = (f"<h2>Config</h2><p>{esc(config_path or '')}</p><pre>{esc(config_text)}</pre>"
              if config_text is not None else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>headrace report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>headrace report</h1>
<p>History {esc(history)}, {len(spans)} trainer run(s); generated {esc(_when(_dt.datetime.now().timestamp()))}.</p>
{''.join(f'<p>{esc(n)}</p>' for n in notes)}
<h2>Summary</h2><table>{rows}</table>
<h2>Trainer runs</h2><table><tr><th>#</th><th>first record</th><th>last record</th><th>from samples</th>
<th>to samples</th><th>records</th></tr>{runs}</table>
{sections}
{config}
</body></html>
"""
