"""The id statistics a mapping version was fitted on, kept beside it for row migration.

A trainer migrates embedding rows when it reaches the first batch of a new mapping version,
weighting each id by its access count. Reading the counts live from the cache at that
moment would make the migration depend on when the trainer got there: a run resumed from a
checkpoint before the boundary, or another rank of a sharded job, would see other counts
and build other rows. So the fit saves the counts it used (``save_migration_stats``) before
it saves the mapping version, and every migration to that version loads them
(``load_migration_stats``): the boundary is then a deterministic step like any other.

Layout: ``<mappings dir>/stats-<version:012d>.npz`` (numpy's npz, no pickles), one
``ids_<i>`` int64 and ``counts_<i>`` float64 array per feature and the feature names in
``features``. Written atomically and durably; a file whose mapping version is no longer
stored (``MappingStore.prune``) is deleted by the next save.

Example:
    >>> import tempfile, numpy as np
    >>> from storage.mapping_store import MappingStore
    >>> store = MappingStore(tempfile.mkdtemp())
    >>> _ = save_migration_stats(store, 1, {"user": (np.array([7, 9]), np.array([3.0, 1.0]))})
    >>> load_migration_stats(store, 1)["user"][1].tolist(), load_migration_stats(store, 2)
    ([3.0, 1.0], None)
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Mapping

import numpy as np

from storage.atomic import atomic_write_bytes
from storage.errors import CacheError
from storage.mapping_store import MappingStore

__all__ = ["save_migration_stats", "load_migration_stats", "migration_stats_path"]

_FILE = re.compile(r"^stats-(\d{12})\.npz$")

Stats = Mapping[str, tuple[np.ndarray, np.ndarray]]


def migration_stats_path(store: MappingStore, version: int) -> str:
    return os.path.join(store.directory, f"stats-{version:012d}.npz")


def save_migration_stats(store: MappingStore, version: int, stats: Stats) -> str:
    """Save ``{feature: (ids, counts)}`` as the statistics of mapping ``version`` (replacing
    any earlier file of that version: a fit that crashed before saving its mapping leaves
    one) and delete those of older versions the store no longer holds. Returns the path."""
    os.makedirs(store.directory, exist_ok=True)
    features = list(stats)
    arrays: dict[str, np.ndarray] = {"features": np.array(features, dtype=np.str_)}
    for i, f in enumerate(features):
        ids, counts = stats[f]
        arrays[f"ids_{i}"] = np.ascontiguousarray(ids, dtype=np.int64)
        arrays[f"counts_{i}"] = np.ascontiguousarray(counts, dtype=np.float64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = migration_stats_path(store, version)
    atomic_write_bytes(path, buf.getvalue())
    kept = set(store.versions())
    for name in os.listdir(store.directory):
        m = _FILE.match(name)
        if m and int(m.group(1)) < version and int(m.group(1)) not in kept:
            try:
                os.unlink(os.path.join(store.directory, name))
            except FileNotFoundError:  # another saver got there first
                continue
    return path


def load_migration_stats(store: MappingStore, version: int) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The statistics saved for mapping ``version``, or None when none were (a version
    saved by other means). ``CacheError`` naming the file when it is unreadable."""
    path = migration_stats_path(store, version)
    try:
        with np.load(path, allow_pickle=False) as npz:
            features = [str(f) for f in npz["features"]]
            return {f: (npz[f"ids_{i}"], npz[f"counts_{i}"]) for i, f in enumerate(features)}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise CacheError(f"{path}: unreadable id statistics of mapping version {version} ({exc}); "
                              "delete it to migrate with the cache's current statistics") from None
