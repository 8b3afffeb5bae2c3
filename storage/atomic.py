"""Atomic file replacement, and fsync, for every file headrace writes whole: checkpoints,
mapping sets, manifests, status files.

``atomic_write(path, write_fn, durable=...)`` writes into a temporary file in the same
directory (``.<name>.<random>.tmp``), renames it over ``path``, and with ``durable=True``
(the default) fsyncs the file before the rename and the directory after it.

* Atomic, always: readers see either the whole old file or the whole new one, never a
  mix, and a process crash at any instant leaves one of the two. If ``write_fn`` raises,
  ``path`` is untouched and the temporary file is removed. Concurrent writers of the same
  path: the last rename wins (each writer's file is whole).
* Durable, with ``durable=True``: once the call returns, the new file survives a machine
  crash (power loss). With ``durable=False`` a machine crash may bring back the old file
  (or, on some filesystems, an empty one); use it only where the caller makes the result
  durable itself, e.g. files inside a directory that is fsynced as a whole before it is
  renamed into place (``trainer.checkpoint.ShardedCheckpointManager``), or where losing
  the newest version costs nothing.

* A full file system (``ENOSPC``/``EDQUOT`` from a write, fsync or rename) raises
  ``storage.errors.DiskFullError`` naming ``path``, its free bytes and the bytes written
  when it failed; ``path`` is untouched.

``fsync_path(path)`` fsyncs one file or directory (a directory's fsync makes the names
created, renamed or removed in it durable).

Example:
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "mapping.bin")
    >>> atomic_write_bytes(p, b"v1")
    >>> atomic_write(p, lambda fh: fh.write(b"v2"))
    >>> open(p, "rb").read()
    b'v2'
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

from storage.disk_space import disk_full_error, is_disk_full_errno

__all__ = ["atomic_write", "atomic_write_bytes", "fsync_path"]


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync the file or directory ``path`` (opened read-only, which POSIX allows for both)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[BinaryIO], object], *,
                 durable: bool = True) -> None:
    """Replace ``path`` atomically with what ``write_fn(fh)`` writes to the binary file
    ``fh`` (see the module docstring for ``durable``). The directory must exist. The new
    file gets mode 0o644 minus the umask (a temporary file would otherwise keep 0o600)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write_fn(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        # Everything that can fail runs before the rename, so the temp file still exists.
        written = os.stat(tmp).st_size
        os.unlink(tmp)
        if is_disk_full_errno(exc):
            raise disk_full_error(path, what=f"writing {os.path.basename(path)}",
                                  needed_bytes=written, at_least=True) from exc
        raise
    if durable:
        fsync_path(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *,
                       durable: bool = True) -> None:
    """Replace ``path`` atomically with ``data`` (see ``atomic_write``)."""
    atomic_write(path, lambda fh: fh.write(data), durable=durable)


def read_json_manifest(file: str | os.PathLike[str], *, fmt: Any, what: str,
                       error: type[Exception]) -> dict[str, Any] | None:
    """The JSON document at ``file`` whose ``"format"`` must equal ``fmt`` (None when the
    file does not exist); ``error`` naming ``what`` when it is not JSON or of another format."""
    try:
        with open(file, "rb") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise error(f"{file}: not a valid {what} ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise error(f"{file}: {what} format {got!r}, this headrace reads format {fmt}")
    return doc
