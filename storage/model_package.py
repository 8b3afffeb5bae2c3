"""Model packages on disk: one directory per export, written atomically, full or delta.

A package is a directory (``headrace export --out DIR``)::

    manifest.json                  written last: format, kind (full | delta), id, parent,
                                   the files and their sizes, and what the exporter adds
                                   (config hash, mapping version, trained samples, ...)
    config.json, dense.pt, ...     files the exporter names (``write_package(files=...)``)
    tables/<collection>/<table>.npy          full: every row [rows, dim]
    tables/<collection>/<table>.rows.npy     delta: the row numbers that changed (int64)
    tables/<collection>/<table>.values.npy   delta: their new values [n, dim]

Tables are ``.npy`` arrays (``allow_pickle=False``) in the export's dtype; bfloat16, which
numpy lacks, is stored as its uint16 bit patterns (``TableEntry.dtype`` says which).

Atomicity: ``write_package`` writes everything into a temporary directory beside the
target (``.<name>.<random>.tmp``), fsyncs every file and directory, then renames it into
place and fsyncs the parent: a reader sees the whole package or none, and a crash (SIGKILL,
power loss) at any instant leaves at most a temporary directory, which
``remove_stale_temps`` deletes. Packages are immutable: writing over an existing one is a
``ModelPackageError``. ``remove_package`` renames a package away before deleting it, so a
half-deleted package is never visible under its name either.

Chains: a delta names its parent (``parent: {"id", "name", "path"}``); ``package_chain``
walks from a package back to its full base (a parent is looked up beside the delta first,
then at its recorded absolute path) and checks every id. ``resolve_tables`` applies the
deltas' rows to the base's tables in order, so base + deltas reproduce the tables of a full
export of the same state bitwise.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

from storage.atomic import fsync_path, read_json_manifest
from storage.disk_space import disk_full_error, is_disk_full_errno
from storage.errors import ModelPackageError

__all__ = [
    "PACKAGE_FORMAT", "MANIFEST", "PackageKind", "TableEntry", "write_package", "read_manifest",
    "read_array", "array_writer", "package_chain", "resolve_tables", "newest_file", "new_package_id",
    "list_packages", "remove_package", "remove_stale_temps", "prune_packages", "table_files",
    "ChainLink", "scheduled_name", "json_bytes",
]

PACKAGE_FORMAT = 1
MANIFEST = "manifest.json"
_TEMP = re.compile(r"^\..+\.tmp$")
_SAFE = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: How names of scheduled exports look (``list_packages``): pkg-<sequence>.
_SCHEDULED = re.compile(r"^pkg-(\d{8})$")

FileContent = bytes | Callable[[BinaryIO], object]


class PackageKind(enum.Enum):
    FULL = "full"
    DELTA = "delta"


@dataclasses.dataclass(frozen=True)
class TableEntry:
    """One table as a package stores it: ``rows`` x ``dim`` values of ``dtype`` (``fp32``,
    ``fp16`` or ``bf16``, the last as uint16 bit patterns); in a delta, ``changed`` rows."""

    rows: int
    dim: int
    dtype: str
    changed: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"rows": self.rows, "dim": self.dim, "dtype": self.dtype}
        if self.changed is not None:
            out["changed"] = self.changed
        return out


@dataclasses.dataclass(frozen=True)
class ChainLink:
    path: str
    manifest: dict[str, Any]

    @property
    def kind(self) -> PackageKind:
        return PackageKind(self.manifest["kind"])


def new_package_id() -> str:
    return uuid.uuid4().hex


def array_writer(array: np.ndarray) -> Callable[[BinaryIO], object]:
    """A ``write_package`` file body that stores ``array`` as ``.npy``."""
    return lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def table_files(collection: str, table: str) -> tuple[str, str, str]:
    """(full rows file, delta row-numbers file, delta values file) of one table."""
    for part in (collection, table):
        if not _SAFE.match(part) or part.startswith("."):
            raise ModelPackageError(f"table name {collection}/{table} cannot be a file name in a package "
                                    "(letters, digits, '_', '-', '.' only)")
    base = f"tables/{collection}/{table}"
    return f"{base}.npy", f"{base}.rows.npy", f"{base}.values.npy"


def _checked_rel(rel: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or rel == MANIFEST:
        raise ModelPackageError(f"package file name {rel!r} is not a relative path inside the package")
    return rel


def write_package(path: str | os.PathLike[str], files: Mapping[str, FileContent],
                  manifest: Mapping[str, Any]) -> str:
    """Write a package at ``path`` atomically and durably (module docstring): ``files`` maps
    relative names (``/`` separated) to bytes or a function writing to a binary file;
    ``manifest`` (JSON-ready, must carry ``kind`` and ``id``) gets ``format`` and ``files``
    (name -> bytes) added. Returns the absolute path. ``ModelPackageError`` when ``path``
    exists; ``DiskFullError`` when the file system fills up (nothing is left behind)."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    PackageKind(manifest["kind"])
    if os.path.exists(path):
        raise ModelPackageError(f"{path} exists; packages are immutable: export to a new directory")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    written = 0
    try:
        sizes: dict[str, int] = {}
        dirs = {tmp}
        for rel, body in files.items():
            target = os.path.join(tmp, *_checked_rel(rel).split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            dirs.add(os.path.dirname(target))
            with open(target, "wb") as fh:
                if isinstance(body, (bytes, bytearray, memoryview)):
                    fh.write(body)
                else:
                    body(fh)
                fh.flush()
                os.fsync(fh.fileno())
                sizes[rel] = fh.tell()
                written += sizes[rel]
        doc = {**manifest, "format": PACKAGE_FORMAT, "files": sizes}
        with open(os.path.join(tmp, MANIFEST), "wb") as fh:
            fh.write(json_bytes(doc))
            fh.flush()
            os.fsync(fh.fileno())
        for d in sorted(dirs, key=len, reverse=True):
            fsync_path(d)
        os.rename(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full_errno(exc):
            raise disk_full_error(parent, what=f"writing model package {name}", needed_bytes=written,
                                  at_least=True) from exc
        if isinstance(exc, OSError) and os.path.exists(path):
            raise ModelPackageError(f"{path} appeared while it was written (two exporters?); "
                                    "packages are immutable: export to a new directory") from None
        raise
    fsync_path(parent)
    return path


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the package at ``path``; ``ModelPackageError`` when there is none
    (not a package, or an export that never finished) or it is of another format."""
    path = os.fspath(path)
    doc = read_json_manifest(os.path.join(path, MANIFEST), fmt=PACKAGE_FORMAT, what="model package manifest",
                             error=ModelPackageError)
    if doc is None:
        raise ModelPackageError(f"{path} is not a model package (no {MANIFEST}); export one with "
                                "`headrace export -c CONFIG --out DIR`")
    return doc


def read_array(path: str | os.PathLike[str], rel: str) -> np.ndarray:
    """The ``.npy`` array ``rel`` of the package at ``path`` (in memory, writable)."""
    file = os.path.join(os.fspath(path), *_checked_rel(rel).split("/"))
    try:
        return np.load(file, allow_pickle=False)
    except FileNotFoundError:
        raise ModelPackageError(f"package {path} lacks {rel}; the package is damaged") from None
    except ValueError as exc:
        raise ModelPackageError(f"package {path}: {rel} is not a valid array ({exc})") from None


def _parent_path(path: str, parent: Mapping[str, Any]) -> str:
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), parent["name"])
    if os.path.isdir(beside):
        return beside
    return parent["path"]


def package_chain(path: str | os.PathLike[str], *, stop_at_id: str | None = None) -> list[ChainLink]:
    """The packages from the full base (or the package with id ``stop_at_id``, excluded) to
    the one at ``path``, oldest first. ``ModelPackageError`` when a parent is missing or is not
    the package the delta was made against."""
    chain: list[ChainLink] = []
    here = os.path.abspath(os.fspath(path))
    seen = set()
    while True:
        manifest = read_manifest(here)
        if stop_at_id is not None and manifest["id"] == stop_at_id:
            break
        if manifest["id"] in seen:
            raise ModelPackageError(f"package chain of {path} has a cycle at {here}")
        seen.add(manifest["id"])
        chain.append(ChainLink(here, manifest))
        parent = manifest.get("parent")
        if manifest["kind"] == PackageKind.FULL.value:
            if stop_at_id is not None:
                raise ModelPackageError(
                    f"package {path} does not follow package {stop_at_id}: its chain reaches the full "
                    f"package {here} first; load it with load_model instead")
            break
        if not parent:
            raise ModelPackageError(f"delta package {here} names no parent")
        parent_dir = _parent_path(here, parent)
        try:
            parent_id = read_manifest(parent_dir)["id"]
        except ModelPackageError as exc:
            raise ModelPackageError(f"delta package {here} needs its parent {parent['name']} "
                                    f"(id {parent['id']}), which is not loadable: {exc}") from None
        if parent_id != parent["id"]:
            raise ModelPackageError(f"delta package {here} was made against package id {parent['id']}, but "
                                    f"{parent_dir} is package {parent_id}")
        here = parent_dir
    return chain[::-1]


def resolve_tables(chain: list[ChainLink], start: Mapping[str, Mapping[str, np.ndarray]] | None = None
                   ) -> dict[str, dict[str, np.ndarray]]:
    """``{collection: {table: array}}`` after applying ``chain`` (oldest first) to ``start``
    (a chain from ``package_chain(stop_at_id=...)``) or to the chain's full base. Arrays of
    ``start`` that a delta changes are copied, never written in place."""
    tables: dict[str, dict[str, np.ndarray]] = {c: dict(t) for c, t in (start or {}).items()}
    for link in chain:
        full = link.kind is PackageKind.FULL
        if full:
            tables = {}
        for collection, entries in link.manifest["tables"].items():
            have = tables.setdefault(collection, {})
            for table, meta in entries.items():
                entry = TableEntry(**meta)
                whole, rows_file, values_file = table_files(collection, table)
                if full:
                    have[table] = _checked_table(read_array(link.path, whole), entry, link.path, table)
                    continue
                if table not in have:
                    raise ModelPackageError(f"delta {link.path} changes table {collection}/{table}, which its "
                                            "parent lacks")
                rows = read_array(link.path, rows_file)
                values = read_array(link.path, values_file)
                if rows.shape != (entry.changed,) or values.shape[0] != entry.changed:
                    raise ModelPackageError(f"delta {link.path}: table {collection}/{table} lists {entry.changed} "
                                            f"changed rows but stores {rows.shape} / {values.shape}")
                updated = have[table].copy()
                updated[rows] = values
                have[table] = updated
    return tables


def _checked_table(array: np.ndarray, entry: TableEntry, path: str, table: str) -> np.ndarray:
    if array.shape != (entry.rows, entry.dim):
        raise ModelPackageError(f"package {path}: table {table} is {array.shape}, its manifest says "
                                f"{(entry.rows, entry.dim)}")
    return array


def newest_file(chain: list[ChainLink], rel: str) -> str:
    """The path of ``rel`` in the newest package of ``chain`` that holds it."""
    for link in reversed(chain):
        if rel in link.manifest.get("files", {}):
            return os.path.join(link.path, *rel.split("/"))
    raise ModelPackageError(f"no package of the chain ending at {chain[-1].path} holds {rel}")


def list_packages(directory: str | os.PathLike[str]) -> list[str]:
    """Complete scheduled packages (``pkg-<n:08d>`` with a manifest) in ``directory``,
    oldest first ([] when the directory does not exist)."""
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = sorted((int(m.group(1)), n) for n in names if (m := _SCHEDULED.match(n))
                   and os.path.exists(os.path.join(directory, n, MANIFEST)))
    return [os.path.join(directory, n) for _, n in found]


def scheduled_name(sequence: int) -> str:
    return f"pkg-{sequence:08d}"


def remove_package(path: str | os.PathLike[str]) -> None:
    """Delete a package: renamed away first (atomically), then removed."""
    path = os.path.abspath(os.fspath(path))
    gone = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary directories of exports or deletions a crash interrupted. Only for
    a directory one exporter writes (another's export in flight looks the same)."""
    directory = os.fspath(directory)
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for n in names:
        p = os.path.join(directory, n)
        if _TEMP.match(n) and os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def prune_packages(directory: str | os.PathLike[str], keep: int) -> list[str]:
    """Delete all but the newest ``keep`` scheduled packages and the packages their chains
    need (a kept delta keeps its parents). Returns the removed paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    packages = list_packages(directory)
    needed: set[str] = set()
    for p in packages[-keep:]:
        needed.update(link.path for link in package_chain(p))
    removed = []
    for p in packages:
        if os.path.abspath(p) not in needed:
            remove_package(p)
            removed.append(p)
    return removed



def json_bytes(doc: Mapping[str, Any]) -> bytes:
    """A JSON document as packages store them (sorted keys, indented)."""
    return json.dumps(doc, sort_keys=True, indent=1).encode()
