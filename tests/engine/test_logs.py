"""Log lines: ``--log-format json`` gives one JSON object per line (errors and progress too);
the progress line rewrites itself on a terminal and is a periodic log record elsewhere."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings

import orjson

from engine.logs import PROGRESS_LOGGER, JsonFormatter
from engine.progress import ProgressLine
from tests.engine_helpers import headrace, small_config_doc, write_config


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_carry_fields_and_exceptions():
    fmt = JsonFormatter()
    rec = logging.LogRecord("headrace.x", logging.WARNING, __file__, 1, "read %d events", (5,), None)
    rec.fields = {"lag": 3, "auc": None}
    out = orjson.loads(fmt.format(rec))
    assert out["message"] == "read 5 events" and out["level"] == "WARNING" and out["logger"] == "headrace.x"
    assert out["fields"] == {"lag": 3, "auc": None} and out["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("headrace.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = orjson.loads(fmt.format(rec))
    assert "ValueError: boom" in out["exception"] and "\n" not in fmt.format(rec)


def test_progress_is_a_log_record_when_stderr_is_not_a_terminal(caplog):
    stream = io.StringIO()
    line = ProgressLine(stream=stream, log_every_s=3600)
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        line.update("train: 128 samples", fields={"trained_samples": 128})
        line.update("train: 256 samples", fields={"trained_samples": 256})  # within log_every_s: dropped
        line.update("train: 384 samples", force=True)
        line.close()
    assert stream.getvalue() == ""  # nothing drawn on a non-terminal
    records = [r for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert [r.getMessage() for r in records] == ["train: 128 samples", "train: 384 samples"]
    assert records[0].fields == {"trained_samples": 128}
    assert orjson.loads(JsonFormatter().format(records[0]))["fields"] == {"trained_samples": 128}


def test_the_first_progress_line_shows_on_a_host_booted_just_now(caplog, monkeypatch):
    """monotonic() counts from boot: on a host up for less than log_every_s the first line
    must still be logged (it was dropped when the last-shown time started at 0)."""
    monkeypatch.setattr("engine.progress.time.monotonic", lambda: 12.0)
    line = ProgressLine(stream=io.StringIO(), log_every_s=60)
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        line.update("serve: read 10")
        line.update("serve: read 20")  # 0 s later: within log_every_s
    assert [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER] == ["serve: read 10"]


def test_progress_rewrites_one_line_on_a_terminal(caplog):
    term = _Terminal()
    line = ProgressLine(stream=term)
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        line.update("serve: read 10", force=True)
        line.update("serve: 9", force=True)
        line.close()
    assert term.getvalue() == "\rserve: read 10\rserve: 9      \n"  # padded over the longer line
    assert not [r for r in caplog.records if r.name == PROGRESS_LOGGER]


def test_cli_errors_are_json_log_lines_with_log_format_json(tmp_path):
    config = write_config(tmp_path, small_config_doc(tmp_path))
    res = headrace("--log-format", "json", "report", "-c", str(config), timeout_s=120)
    assert res.returncode == 4
    lines = [orjson.loads(x) for x in res.stderr.splitlines() if x.strip()]  # every line parses
    err = lines[-1]
    assert err["level"] == "ERROR" and "no metrics history at" in err["message"]
    assert err["fields"] == {"error": "HistoryError", "retriable": False, "exit_code": 4}
    plain = headrace("report", "-c", str(config), timeout_s=120)
    assert plain.returncode == 4 and plain.stderr.startswith("headrace: error: no metrics history at")


class LogsWhenUnpickled:
    """An argument whose unpickling in the child logs on the root logger, as importing Beam
    does (a bare ``logging.warning`` installs a default handler when there is none yet)."""

    def __reduce__(self):
        return logging.warning, ("logged while the child unpickles its arguments",)


def child_that_logs(_arg=None) -> None:
    """Runs in a spawned child: a log record with fields and a Python warning."""
    logging.getLogger("headrace.child").warning("from the child", extra={"fields": {"x": 1}})
    warnings.warn("a library warning", UserWarning)


def test_children_log_json_in_the_parents_format():
    code = ("import logging; from engine.logs import configure_logging; configure_logging(logging.WARNING, 'json'); "
            "from engine.processes import spawn_child; "
            "from tests.engine.test_logs import LogsWhenUnpickled, child_that_logs; "
            "p = spawn_child('kid', child_that_logs, LogsWhenUnpickled()); p.join(); raise SystemExit(p.exitcode)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [orjson.loads(x) for x in res.stderr.splitlines() if x.strip()]  # every line parses
    kid = [x for x in lines if x["process"] == "kid"]
    assert [x["message"] for x in kid if x["logger"] == "headrace.child"] == ["from the child"]
    assert any("a library warning" in x["message"] for x in kid)
    assert any(x["message"] == "logged while the child unpickles its arguments" for x in kid)
