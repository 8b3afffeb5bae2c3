"""Versioned id-mapping sets on disk: one immutable file per version in one directory.

Layout: ``<directory>/mappings-<version:012d>.hrms``, each holding one
``transforms.mappers.MappingSet`` as ``MappingSet.to_bytes`` writes it. ``save`` writes
atomically and durably (``storage.atomic``): a reader sees a whole set or none, and a
saved version survives a machine crash. Versions are immutable: saving one that exists is
a ``MappingError``; a re-fit saves ``latest + 1``.

Where the directory is (``mappings_dir``): ``[hash] mappings_dir``, or ``mappings/`` next
to the batch cache's files when that is empty.

Readers (the pipeline's workers, the trainer's row migration, fit-hash) load the newest
version, or a given one; before the first fit there is none and ``load_or_default`` gives
the configured default mapper as version 0. A ``MappingStore`` holds only its directory
path, so it pickles into Beam workers, which open the files themselves (the directory
must be visible to them, as the cache is).

Example:
    >>> import tempfile
    >>> from transforms.config import SchemaConfig, SparseFeature
    >>> from transforms.mappers import MappingSet, make_mapper
    >>> schema = SchemaConfig(sparse=(SparseFeature("user", rows=10),))
    >>> store = MappingStore(tempfile.mkdtemp())
    >>> store.load_or_default(schema).version, store.latest_version()
    (0, None)
    >>> v1 = MappingSet(1, {"user": make_mapper("double", 10)})
    >>> _ = store.save(v1)
    >>> store.versions(), store.load_or_default(schema) == v1
    ([1], True)
"""

from __future__ import annotations

import os
import re

from storage.atomic import atomic_write_bytes, fsync_path
from storage.config import CacheConfig
from transforms.config import HashConfig, SchemaConfig
from transforms.errors import MappingError
from transforms.mappers import MappingSet

__all__ = ["MappingStore", "mappings_dir"]

_FILE = re.compile(r"^mappings-(\d{12})\.hrms$")


def mappings_dir(hash_cfg: HashConfig, cache_cfg: CacheConfig) -> str:
    """Where fitted id mappings live: ``[hash] mappings_dir``, or ``<cache.path>/mappings``."""
    return hash_cfg.mappings_dir or os.path.join(cache_cfg.path, "mappings")


class MappingStore:
    """The mapping sets of one directory (created by the first ``save``). Safe for many
    readers and processes; one writer at a time (two writers saving the same version:
    the last rename wins)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = os.fspath(directory)

    @classmethod
    def from_config(cls, hash_cfg: HashConfig, cache_cfg: CacheConfig) -> "MappingStore":
        return cls(mappings_dir(hash_cfg, cache_cfg))

    def __repr__(self) -> str:
        return f"MappingStore({self.directory!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MappingStore) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash(self.directory)

    def path(self, version: int) -> str:
        """The file of ``version``."""
        return os.path.join(self.directory, f"mappings-{version:012d}.hrms")

    def versions(self) -> list[int]:
        """Stored versions, ascending ([] when the directory does not exist). One
        ``listdir``: cheap enough to poll."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_FILE.match, names) if m)

    def latest_version(self) -> int | None:
        """The highest stored version, None when there is none."""
        versions = self.versions()
        return versions[-1] if versions else None

    def load(self, version: int | None = None) -> MappingSet:
        """The stored set of ``version`` (default: the highest). MappingError when there
        is none, it is not stored, or its file is corrupt."""
        return self._load(self.versions(), version)

    def load_or_default(self, schema: SchemaConfig, default_mapper: str = "modulo",
                        version: int | None = None) -> MappingSet:
        """The set of ``version`` (default: the newest stored), checked against ``schema``;
        ``MappingSet.default(schema, default_mapper)`` when none is stored, or when
        ``version`` is 0 and was never saved (version 0 is the default until a fit)."""
        versions = self.versions()
        if (version is None and not versions) or (version == 0 and 0 not in versions):
            return MappingSet.default(schema, default_mapper)
        ms = self._load(versions, version)
        ms.check_schema(schema)
        return ms

    def _load(self, versions: list[int], version: int | None) -> MappingSet:
        if not versions:
            raise MappingError(f"no mapping sets (mappings-*.hrms) in {self.directory!r}")
        v = versions[-1] if version is None else version
        if v not in versions:
            raise MappingError(f"mapping version {v} not in {self.directory!r} (have {versions})")
        path = self.path(v)
        with open(path, "rb") as fh:
            ms = MappingSet.from_bytes(fh.read(), where=path)
        if ms.version != v:
            raise MappingError(f"{path} holds version {ms.version}, its name says {v}")
        return ms

    def prune(self, keep: int, needed_from: int | None = None) -> list[int]:
        """Delete stored versions older than the ``keep`` newest, except those at or after
        ``needed_from`` (the oldest version a reader may still ask for: of a cached batch
        or a checkpoint; None = nothing older is needed). ``keep`` 0 keeps everything.
        Returns the deleted versions. A reader that loads a deleted version gets the
        store's MappingError naming the versions that exist."""
        if keep <= 0:
            return []
        versions = self.versions()
        floor = versions[-keep] if len(versions) > keep else None
        if floor is None:
            return []
        if needed_from is not None:
            floor = min(floor, needed_from)
        gone = [v for v in versions if v < floor]
        for v in gone:
            try:
                os.unlink(self.path(v))
            except FileNotFoundError:  # another pruner got there first
                continue
        if gone:
            fsync_path(self.directory)
        return gone

    def save(self, mappings: MappingSet) -> str:
        """Write ``mappings`` as its version's file, atomically and durably; returns the
        path. MappingError when that version exists (versions are immutable)."""
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(mappings.version)
        if os.path.exists(path):
            raise MappingError(
                f"{path} exists; mapping versions are immutable, save as version {mappings.version + 1}")
        atomic_write_bytes(path, mappings.to_bytes())
        return path
