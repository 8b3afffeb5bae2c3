"""``backfill`` on a real dask.distributed cluster (2 worker processes) caches exactly what
the Direct runner caches, row for row, and a rerun adds nothing."""

from __future__ import annotations

import socket

import pytest

from engine.backfill import backfill, backfill_pipeline_main
from engine.config import config_from_dict
from engine.errors import ConfigError
from streams.synthetic import generate_payloads
from tests.engine_helpers import SMALL_SPEC, cache_counts, cached_table, small_config_doc

pytestmark = pytest.mark.slow
distributed = pytest.importorskip("dask.distributed")
from distributed.diagnostics.task_stream import TaskStreamPlugin  # noqa: E402

FILES, LINES = 3, 700


def _config(tmp_path, cache: str, **pipeline):
    doc = small_config_doc(tmp_path, cache=cache, metrics={"listen": ""},
                           **({"pipeline": pipeline} if pipeline else {}))
    return config_from_dict(doc)


def _rows(cache_path) -> dict[tuple[str, int, int], dict]:
    """Every cached row by (topic, partition, offset)."""
    out = {}
    for topic, partition, batch in cached_table(cache_path):
        for row in batch.to_pylist():
            key = (topic, partition, row["_offset"])
            assert key not in out, f"offset cached twice: {key}"
            out[key] = row
    return out


def test_dask_backfill_caches_the_same_rows_as_the_direct_runner_and_a_rerun_adds_nothing(tmp_path):
    paths = []
    for i in range(FILES):
        lines = generate_payloads(SMALL_SPEC, LINES, start=i * LINES, bad_fraction=0.02)
        path = tmp_path / f"events-{i}.jsonl"
        path.write_bytes(b"\n".join(ln.replace(b"\n", b" ") for ln in lines) + b"\n")
        paths.append(str(path))

    backfill_pipeline_main(_config(tmp_path, "direct"), paths, None)  # the reference, in this process

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        cfg = _config(tmp_path, "dask", runner="DaskRunner",
                      beam_options=[f"--dask_client_address={cluster.scheduler_address}"])
        tasks = TaskStreamPlugin(cluster.scheduler)
        cluster.scheduler.add_plugin(tasks)
        first = backfill(cfg, paths=paths)
        assert first["read"] == FILES * LINES
        assert {t["worker"] for t in tasks.buffer} == set(cluster.scheduler.workers)  # both processes worked
        before = cache_counts(tmp_path / "dask")
        backfill_pipeline_main(cfg, paths, None)  # the rerun, inline (the CLI's child process, without its start)
        assert cache_counts(tmp_path / "dask") == before

    direct, dask = cache_counts(tmp_path / "direct"), cache_counts(tmp_path / "dask")
    assert dask == direct and direct["dead_letters"] > 0
    rows = _rows(tmp_path / "dask")
    assert len(rows) == direct["cached_rows"] and rows == _rows(tmp_path / "direct")
    assert {topic for topic, _, _ in rows} == {f"file:{p}" for p in paths}


def test_an_unreachable_scheduler_is_a_config_error_naming_the_option(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "events.jsonl"
    log.write_bytes(b"\n".join(generate_payloads(SMALL_SPEC, 10)) + b"\n")
    cfg = _config(tmp_path, "c", runner="DaskRunner",
                  beam_options=[f"--dask_client_address=tcp://127.0.0.1:{port}", "--dask_connection_timeout=2"])
    with pytest.raises(ConfigError, match=rf"--dask_client_address=tcp://127.0.0.1:{port}: cannot reach the Dask"):
        backfill_pipeline_main(cfg, [str(log)], None)
    assert cache_counts(tmp_path / "c")["read"] == 0
