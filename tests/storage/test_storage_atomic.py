"""storage.atomic: whole-file replacement, durable or not, and fsync."""

from __future__ import annotations

import os

import pytest

import storage.atomic
from storage.atomic import atomic_write, atomic_write_bytes, fsync_path


def test_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "ckpt.bin"
    atomic_write_bytes(p, b"old")
    atomic_write(p, lambda fh: (fh.write(b"new-"), fh.write(b"contents")))
    assert p.read_bytes() == b"new-contents"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.bin"]
    assert p.stat().st_mode & 0o777 == 0o644 & ~_umask()


def test_failing_writer_keeps_old_file(tmp_path):
    p = tmp_path / "mapping.bin"
    atomic_write_bytes(p, b"v1")

    def boom(fh):
        fh.write(b"partial")
        raise ValueError("disk says no")

    with pytest.raises(ValueError, match="disk says no"):
        atomic_write(p, boom)
    assert p.read_bytes() == b"v1"
    assert sorted(os.listdir(tmp_path)) == ["mapping.bin"]


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "nope" / "f.bin", b"x")


def test_durable_fsyncs_file_and_directory_and_not_durable_neither(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(storage.atomic.os, "fsync", fsync)
    p = tmp_path / "manifest.json"
    atomic_write_bytes(p, b"{}", durable=False)
    assert synced == [] and p.read_bytes() == b"{}"
    atomic_write_bytes(p, b"[]")
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    assert p.read_bytes() == b"[]" and sorted(os.listdir(tmp_path)) == ["manifest.json"]
    synced.clear()
    fsync_path(p)
    fsync_path(tmp_path)
    assert synced == [str(p), str(tmp_path)]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
