"""Small real file systems for disk-full tests, mounted under the test's tmp_path: a tmpfs
(``mounted_tmpfs``), or an ext4 image on a loop device (``mounted_ext4``) where a test needs
disk semantics (on tmpfs even *reading* a hole of a memory-mapped file allocates memory).

Mounting needs root (or CAP_SYS_ADMIN, and loop devices for ext4); where that is impossible
the test is skipped with the reason, never faked. ``grow`` remounts a tmpfs bigger in place,
as an operator freeing space would, without touching its files.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

__all__ = ["mounted_tmpfs", "mounted_ext4", "grow", "fill_to"]


def _run_or_skip(cmd: list[str], what: str) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        pytest.skip(f"cannot make {what} for a disk-full test: {exc}")
    if res.returncode != 0:
        pytest.skip(f"cannot make {what} for a disk-full test (needs root, or CAP_SYS_ADMIN and loop "
                    f"devices): {cmd[0]}: {res.stderr.strip() or res.returncode}")


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size_bytes: int):
    path.mkdir(parents=True, exist_ok=True)
    _run_or_skip(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                 f"a {size_bytes}-byte tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def mounted_ext4(path: Path, size_bytes: int):
    path.mkdir(parents=True, exist_ok=True)
    image = path.parent / (path.name + ".img")
    with open(image, "wb") as fh:
        fh.truncate(size_bytes)
    try:
        _run_or_skip(["mkfs.ext4", "-q", "-F", str(image)], f"a {size_bytes}-byte ext4 image")
        _run_or_skip(["mount", "-o", "loop", str(image), str(path)], f"a {size_bytes}-byte ext4 loop mount")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        image.unlink(missing_ok=True)


def grow(path: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True, capture_output=True)


def fill_to(path: Path, free_bytes: int) -> Path:
    """Write a filler file so that about ``free_bytes`` stay free on ``path``'s file system."""
    st = os.statvfs(path)
    filler = path / "filler"
    size = max(0, st.f_bavail * st.f_frsize - free_bytes)
    with open(filler, "wb") as fh:
        fh.write(b"\0" * size)
    return filler
