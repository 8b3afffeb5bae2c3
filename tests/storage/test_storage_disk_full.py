"""Full disks: every store says which path's file system is full, how much was free and
what the write needed, stores nothing of the failed write, and works again once space is
back; the cache refuses writes that would dip into the disk reserve before the disk is full."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import storage.batch_cache as batch_cache_module
from engine.config import config_from_dict
from engine.errors import ConfigError, exit_code_of
from storage.atomic import atomic_write_bytes
from storage.batch_cache import BatchCache
from storage.disk_space import disk_usage, effective_reserve_bytes
from storage.errors import DiskFullError, DiskReserveError
from tests.small_fs import fill_to, grow, mounted_ext4, mounted_tmpfs
from tests.storage.builders import make_pb, row_offsets

# Multi-process or broker-backed: deselect with -m 'not slow' for a quick run.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_fs(tmp_path):
    with mounted_tmpfs(tmp_path / "fs", 4 << 20) as path:
        yield path


def _fill_cache(cache: BatchCache) -> tuple[int, DiskFullError]:
    off = 0
    for _ in range(1000):
        try:
            cache.write(make_pb("t", 0, off, off + 500, width=8))
        except DiskFullError as exc:
            return off, exc
        off += 500
    raise AssertionError("a 4 MiB file system never filled up")


def _assert_explains(exc: DiskFullError, path: Path) -> None:
    text = str(exc)
    assert str(path) in text and "free" in text and "needed" in text
    assert "max_bytes" in text and "move" in text  # what to do
    assert exc.path == str(path) and exc.needed_bytes > 0 and not exc.retriable
    assert exit_code_of(exc) == 8


@pytest.mark.parametrize("lmdb_fails", [False, True], ids=["checked-before", "lmdb-write-fails"])
def test_cache_on_a_full_disk_raises_disk_full_stores_nothing_and_resumes(small_fs, monkeypatch, lmdb_fails):
    if lmdb_fails:  # the free-space check misses (another writer filled the disk): LMDB's own error
        monkeypatch.setattr(batch_cache_module, "check_free", lambda *a, **k: None)
    path = small_fs / "cache"
    with BatchCache(path, disk_reserve_bytes=0) as cache:
        stored_to, exc = _fill_cache(cache)
        _assert_explains(exc, path)
        assert ("Input/output error" in str(exc)) == lmdb_fails
        assert cache.next_offsets() == {"t": {0: stored_to}}
        counts = cache.counts()
        assert counts["read"] == counts["cached_rows"] == stored_to
    grow(small_fs, 16 << 20)  # space freed
    with BatchCache(path, disk_reserve_bytes=0) as cache:
        cache.write(make_pb("t", 0, stored_to, stored_to + 500, width=8))
        offsets = [o for cb in cache.iter_batches() for o in row_offsets(cb.batch)]
    assert offsets == list(range(stored_to + 500))  # every offset exactly once


def test_reserve_refuses_a_write_before_the_disk_is_full(tmp_path):
    free = disk_usage(tmp_path).free_bytes
    with BatchCache(tmp_path / "c", disk_reserve_bytes=free + (1 << 30)) as cache:
        with pytest.raises(DiskReserveError, match="disk_reserve_bytes") as info:
            cache.write(make_pb("t", 0, 0, 10))
        assert cache.next_offsets() == {} and cache.counts()["read"] == 0
        assert info.value.reserve_bytes == free + (1 << 30)
        disk = cache.stat()["disk"]
        assert disk["paused"] and disk["reserve_bytes"] == free + (1 << 30) and disk["free_bytes"] > 0
    with BatchCache(tmp_path / "c", disk_reserve_bytes=0) as cache:  # reserve lowered: goes on
        cache.write(make_pb("t", 0, 0, 10))
        assert not cache.stat()["disk"]["paused"]


def test_default_reserve_is_a_gib_capped_at_five_percent(small_fs):
    assert effective_reserve_bytes(None, total_bytes=4 << 20) == int((4 << 20) * 0.05)
    assert effective_reserve_bytes(None, total_bytes=100 << 30) == 1 << 30
    fill_to(small_fs, 100 << 10)  # 100 KiB free < 5% of 4 MiB
    with BatchCache(small_fs / "c") as cache:
        with pytest.raises(DiskReserveError):
            cache.write(make_pb("t", 0, 0, 10))


def test_checkpoint_and_mapping_files_on_a_full_disk(small_fs):
    target = small_fs / "ckpt-000000000001.pt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(DiskFullError) as info:
        atomic_write_bytes(target, b"x" * (8 << 20))
    _assert_explains(info.value, target)
    assert "more than" in str(info.value)
    assert target.read_bytes() == b"old"  # untouched
    assert [p.name for p in small_fs.iterdir()] == [target.name]  # no temp file left


def test_row_store_write_on_a_full_disk_is_an_error_not_a_sigbus(tmp_path):
    # On a disk file system (reading a hole does not allocate, writing one does). In a
    # subprocess: without the check a write into a hole of the mapped file is a SIGBUS,
    # which must not take the test runner down.
    with mounted_ext4(tmp_path / "ext4", 8 << 20) as fs:
        script = textwrap.dedent(f"""
            import numpy as np
            from pathlib import Path
            from storage.errors import DiskFullError
            from storage.row_store import RowStore, RowTableSpec
            from tests.small_fs import fill_to
            init = lambda table, rows: np.zeros((len(rows), 8), np.float32)
            store = RowStore({str(fs / 'rows')!r}, [RowTableSpec("t", 200_000, 8, 1)], init, sync=False)
            store.write("t", np.arange(10), np.ones((10, 8), np.float32), np.ones((10, 1), np.float32))
            store.commit()
            filler = fill_to(Path({str(fs)!r}), 64 << 10)
            rows = np.arange(0, 200_000, 50)  # two rows per page: 2000 pages (8 MiB) to allocate
            ones = np.ones((len(rows), 8), np.float32), np.ones((len(rows), 1), np.float32)
            try:
                store.write("t", rows, *ones)
            except DiskFullError as exc:
                print("DISKFULL", exc)
            store.write("t", np.arange(5), np.zeros((5, 8), np.float32), np.zeros((5, 1), np.float32))
            filler.unlink()
            store.write("t", rows[:500], ones[0][:500], ones[1][:500])  # space back: fine
            store.commit()
            print("OK")
        """)
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DISKFULL row store write: the file system holding" in res.stdout
    assert str(tmp_path / "ext4" / "rows") in res.stdout
    assert res.stdout.strip().endswith("OK")


def test_new_cache_keys_are_validated():
    base = {"schema": {"dense": [{"name": "x"}]}}
    cfg = config_from_dict(base)
    assert cfg.cache.disk_reserve_bytes is None and cfg.cache.dead_letter_max_bytes == 256 << 20
    for key in ("disk_reserve_bytes", "dead_letter_max_bytes"):
        with pytest.raises(ConfigError, match=key):
            config_from_dict({**base, "cache": {key: -1}})
