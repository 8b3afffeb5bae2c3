"""One LMDB environment per directory per process, with safe map growth.

Why a registry: LMDB's locks are per (process, file), so opening the same environment
twice in one process corrupts locking (py-lmdb refuses it). ``acquire`` hands every
``BatchCache`` on the same directory in this process one shared ``EnvHandle``
(refcounted), so e.g. a pipeline writer and an in-process trainer reader can coexist.

Why a gate: ``Environment.set_mapsize`` remaps the file, which invalidates every pointer
into the old mapping, including zero-copy Arrow buffers of open read transactions. Every
transaction of this process therefore runs under ``TxnGate.shared()``; a resize takes
``TxnGate.exclusive()``, which waits (bounded) until no transaction is open and holds
new ones back meanwhile. Other processes are unaffected: they keep their own mapping
and adopt the new size (``set_mapsize(0)``) the first time LMDB tells them the data
outgrew it (``MapResizedError``).

Durability (``Durability``): LMDB commits are atomic; a batch committed before a
SIGKILL of the writer is always there after it (the data is in the page cache, owned by
the kernel). What differs is a machine crash or power loss:

- FULL (default): fsync data and meta pages on every commit; a commit that returned
  survives a machine crash. Costs two fsyncs per batch, fine at thousands of rows per batch.
- NO_METASYNC: one fsync per commit; a machine crash may undo the last commit but never
  corrupts. Exactly-once still holds because the batch and its next offset are in the same
  commit: the source simply re-reads the undone range.

NOSYNC (no fsync at all) is not offered: after a machine crash the file may be corrupt.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
from collections.abc import Iterator

import lmdb

from storage.errors import CacheError

__all__ = ["Durability", "EnvHandle", "TxnGate", "acquire", "release", "MAX_DBS", "MAX_READERS"]

#: Sub-databases: 7 of the cache plus room for ``BatchCache.open_db`` users.
MAX_DBS = 32
#: Concurrent read transactions across all processes (one slot per open read txn).
MAX_READERS = 512


class Durability(enum.Enum):
    FULL = "full"
    NO_METASYNC = "no_metasync"


class TxnGate:
    """Shared/exclusive gate over this process's transactions (see module docstring).

    ``shared`` is re-entrant per thread: a thread that already holds it (e.g. inside a
    ``reader()`` block or a zero-copy iterator) gets it again at once even while a resize
    waits, because that resize is waiting for this very thread. ``exclusive`` yields False
    at once when the calling thread holds ``shared`` itself: waiting could never succeed.
    A zero-copy iterator must be advanced and closed on one thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0  # threads holding shared
        self._resizing = False
        self._local = threading.local()

    def held_by_this_thread(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._resizing:
                    self._cond.wait()
                self._active += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                with self._cond:
                    self._active -= 1
                    if self._active == 0:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, wait_s: float) -> Iterator[bool]:
        """Yields True when it holds the gate, False when transactions stayed open for
        ``wait_s`` seconds (``wait_s == 0``: try once without waiting) or the calling
        thread holds ``shared`` itself."""
        if self.held_by_this_thread():
            yield False
            return
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            ok = self._cond.wait_for(lambda: self._active == 0, timeout=wait_s)
            if not ok:
                self._resizing = False
                self._cond.notify_all()
        try:
            yield ok
        finally:
            if ok:
                with self._cond:
                    self._resizing = False
                    self._cond.notify_all()


class EnvHandle:
    """An open environment shared by the ``BatchCache`` objects of one directory."""

    def __init__(self, key: str, env: lmdb.Environment, readonly: bool):
        self.key = key
        self.env = env
        self.readonly = readonly
        self.gate = TxnGate()
        self.refs = 0
        self.dbs: dict[str, object] = {}
        self.dbs_lock = threading.Lock()
        # One write transaction per process at a time, queued here rather than inside
        # LMDB's process-shared mutex (which is not re-entrant across threads).
        self.write_lock = threading.Lock()

    @property
    def map_size_bytes(self) -> int:
        return int(self.env.info()["map_size"])

    def used_bytes(self) -> int:
        info = self.env.info()
        return (int(info["last_pgno"]) + 1) * int(self.env.stat()["psize"])

    def grow(self, min_map_size_bytes: int, wait_s: float) -> None:
        """Set the map size to at least ``min_map_size_bytes`` once no transaction of this
        process is open; raises a retriable CacheError if they stay open ``wait_s``."""
        if self.gate.held_by_this_thread():
            raise CacheError(
                f"cache {self.key}: the LMDB map is full and must grow, but this thread holds a read "
                "transaction (a reader() block or a zero-copy batch) whose memory a resize would unmap; "
                "write after leaving the block, or use copying reads",
                retriable=True,
            )
        with self.gate.exclusive(wait_s) as ok:
            if not ok:
                raise CacheError(
                    f"cache {self.key}: the LMDB map is full and must grow, but read transactions of this "
                    f"process stayed open for {wait_s:.0f} s; close reader() blocks and zero-copy iterators "
                    "sooner (a resize remaps the file)",
                    retriable=True,
                )
            if self.map_size_bytes < min_map_size_bytes:
                self.env.set_mapsize(min_map_size_bytes)

    def adopt_map_size(self, wait_s: float) -> None:
        """Another process grew the map: remap to the size stored in the file."""
        if self.gate.held_by_this_thread():
            raise CacheError(
                f"cache {self.key}: another process grew the LMDB map; reading on needs a remap, which this "
                "thread's open read transaction (a reader() block or a zero-copy batch) prevents; leave the "
                "block and retry",
                retriable=True,
            )
        with self.gate.exclusive(wait_s) as ok:
            if not ok:
                raise CacheError(
                    f"cache {self.key}: another process grew the LMDB map; this process must remap but its "
                    f"read transactions stayed open for {wait_s:.0f} s",
                    retriable=True,
                )
            self.env.set_mapsize(0)

    def try_grow(self, min_map_size_bytes: int) -> bool:
        """Grow now if no transaction of this process is open; never waits."""
        with self.gate.exclusive(0.0) as ok:
            if ok and self.map_size_bytes < min_map_size_bytes:
                self.env.set_mapsize(min_map_size_bytes)
            return ok


_log = logging.getLogger(__name__)
_CLOSE_WAIT_S = 30.0
_registry: dict[str, EnvHandle] = {}
_registry_lock = threading.Lock()


def _open(path: str, map_size_bytes: int, readonly: bool, durability: Durability) -> lmdb.Environment:
    if readonly and not os.path.exists(os.path.join(path, "data.mdb")):
        raise CacheError(
            f"cache {path}: no LMDB cache there (no data.mdb); start the pipeline that writes it first, "
            "or fix [cache] path",
            retriable=True,
        )
    try:
        return lmdb.open(
            path,
            map_size=map_size_bytes,
            subdir=True,
            readonly=readonly,
            create=not readonly,
            sync=True,
            metasync=durability is Durability.FULL,
            # Zero-copy reads need page memory that only LMDB writes through write(2):
            # writemap would let a stray pointer corrupt the file.
            writemap=False,
            max_dbs=MAX_DBS,
            max_readers=MAX_READERS,
            max_spare_txns=4,
            lock=True,
        )
    except lmdb.Error as exc:
        raise CacheError(f"cache {path}: cannot open the LMDB environment: {exc}") from exc


def acquire(path: str | os.PathLike[str], *, map_size_bytes: int, readonly: bool, durability: Durability) -> EnvHandle:
    """Open (or share) the environment at directory ``path``. A read-only handle cannot
    be upgraded: opening a writable cache while a read-only one is open in this process
    raises CacheError."""
    path = os.fspath(path)
    if not readonly:
        os.makedirs(path, exist_ok=True)
    key = os.path.realpath(path)
    with _registry_lock:
        handle = _registry.get(key)
        if handle is None:
            env = _open(path, map_size_bytes, readonly, durability)
            handle = EnvHandle(key, env, readonly)
            if not readonly:
                # Reader slots of crashed processes pin old pages forever; clear them.
                env.reader_check()
            _registry[key] = handle
        elif handle.readonly and not readonly:
            raise CacheError(
                f"cache {path} is already open read-only in this process; open the writable cache first "
                "(read-only users then share it), or close the read-only one"
            )
        handle.refs += 1
        return handle


def release(handle: EnvHandle) -> None:
    """Drop one reference; the environment closes with the last one."""
    with _registry_lock:
        handle.refs -= 1
        if handle.refs > 0:
            return
        _registry.pop(handle.key, None)
    with handle.gate.exclusive(_CLOSE_WAIT_S) as ok:
        if not ok:
            _log.warning(
                "cache %s: closing while read transactions are still open after %.0f s; their zero-copy "
                "batches are invalid from now on", handle.key, _CLOSE_WAIT_S,
            )
        handle.env.close()
