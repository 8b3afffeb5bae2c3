"""Atomic file replacement for checkpoints and id-mapping files.

``atomic_write(path, write_fn)`` writes into a temporary file in the same directory,
fsyncs it, renames it over ``path`` and fsyncs the directory. Readers see either the
whole old file or the whole new one, never a mix, and after the call returns the new
file survives a machine crash. If ``write_fn`` raises, ``path`` is untouched and the
temporary file is removed. Concurrent writers of the same path: the last rename wins
(each writer's file is whole).

Example:
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "mapping.bin")
    >>> atomic_write_bytes(p, b"v1")
    >>> atomic_write(p, lambda fh: fh.write(b"v2"))
    >>> open(p, "rb").read()
    b'v2'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes"]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` atomically with what ``write_fn(fh)`` writes to the binary file
    ``fh``. The directory must exist. The new file gets mode 0o644 minus the umask (a
    temporary file would otherwise keep 0o600)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        # Everything that can fail runs before the rename, so the temp file still exists.
        os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Replace ``path`` atomically with ``data`` (see ``atomic_write``)."""
    atomic_write(path, lambda fh: fh.write(data))
