"""Id mappers: raw 64-bit sparse ids -> embedding-table rows, and versioned sets of them.

An ``IdMapper`` is a pure, vectorised function ``map(ids) -> rows`` plus a serialisable
state. Implementations register a name with ``register_mapper`` so that ``make_mapper``
(config) and ``load_mapper`` (bytes written by ``to_bytes``) can build them.

Writing a mapper (the whole interface)::

    class MyMapper(IdMapper):
        name = "mine"          # registry key, stored in the bytes
        version = 1            # format version of this class's state; bump on change
        lookups = 1            # rows per id (2: map returns shape (2, n), rows summed)

        def __init__(self, rows: int, *, k: int = 3): ...
        def map(self, ids): ...                # int64 (n,) -> int64 (n,) or (lookups, n)
        def state(self): return {"k": self.k}, {"table": self.table}   # JSON params, arrays
        @classmethod
        def from_state(cls, rows, params, arrays, version): ...

    register_mapper("mine", MyMapper)

``map`` must be pure (same ids -> same rows, no mutation), accept any int64 array
(including ``hashing.MISSING_ID``) and return rows in ``[0, rows)``. Ids are signed int64
holding unsigned 64-bit hashes: treat them as uint64.

Byte format of one mapper (``to_bytes``; little-endian)::

    b"HRIDMAP1" | u32 header_len | header (UTF-8 JSON) | array bytes...

with header ``{"name", "version", "rows", "lookups", "params", "arrays": [{"name",
"dtype", "shape", "nbytes"}], "crc32"}``; the arrays follow in header order, C-contiguous;
``crc32`` covers the array bytes. ``from_bytes`` rejects a wrong magic, an unknown name,
a version newer than the class, a size mismatch and a bad checksum with ``MappingError``.

A ``MappingSet`` is ``{feature: IdMapper}`` plus one integer ``version`` for the whole set,
serialised whole by ``to_bytes`` / ``from_bytes``::

    b"HRMAPST1" | u32 header_len | header (JSON {"version", "features": [[name, nbytes]]})
    | mapper blobs in header order

Files are storage's business: ``storage.mapping_store.MappingStore`` keeps one file per
version in a directory and loads the newest (or ``MappingSet.default(schema)``: the
hashing trick with each feature's configured rows, version 0).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import struct
import types
import zlib
from typing import Any, ClassVar, Mapping

import numba
import numpy as np

from transforms.errors import MappingError

__all__ = [
    "IdMapper", "ModuloMapper", "DoubleHashMapper", "MappingSet",
    "register_mapper", "make_mapper", "load_mapper", "registered_mappers",
    "MAPPER_MAGIC", "SET_MAGIC",
]

MAPPER_MAGIC = b"HRIDMAP1"
SET_MAGIC = b"HRMAPST1"
_U32 = struct.Struct("<I")


class IdMapper(abc.ABC):
    """Maps raw int64 ids to rows in ``[0, rows)``; see the module docstring."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    lookups: ClassVar[int] = 1

    def __init__(self, rows: int):
        if not isinstance(rows, (int, np.integer)) or isinstance(rows, bool) or rows < 1:
            raise MappingError(f"{type(self).__name__}: rows must be an integer >= 1, got {rows!r}")
        self.rows = int(rows)

    @abc.abstractmethod
    def map(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` (int64, shape (n,)): int64 shape (n,) when ``lookups == 1``,
        else shape (lookups, n). Pure; never mutates ``ids``."""

    @abc.abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-serialisable params, named numpy arrays) that ``from_state`` rebuilds from."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, rows: int, params: dict[str, Any], arrays: dict[str, np.ndarray],
                   version: int) -> "IdMapper":
        """Rebuild a mapper from ``state()``; ``version`` is the stored format version."""

    @property
    def nbytes(self) -> int:
        """Memory of the mapper's lookup structures (0 for a pure hash): what it adds to the
        embedding table's memory."""
        return 0

    def to_bytes(self) -> bytes:
        params, arrays = self.state()
        metas, chunks = [], []
        for key, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            metas.append({"name": key, "dtype": arr.dtype.str, "shape": list(arr.shape), "nbytes": arr.nbytes})
            chunks.append(arr.tobytes())
        body = b"".join(chunks)
        header = json.dumps({
            "name": self.name, "version": self.version, "rows": self.rows, "lookups": self.lookups,
            "params": params, "arrays": metas, "crc32": zlib.crc32(body),
        }, sort_keys=True).encode()
        return MAPPER_MAGIC + _U32.pack(len(header)) + header + body

    @staticmethod
    def from_bytes(data: bytes) -> "IdMapper":
        return load_mapper(data)

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` as a 1-d int64 array, or MappingError (helper for ``map`` implementations)."""
        ids = np.asarray(ids)
        if ids.dtype != np.int64 or ids.ndim != 1:
            raise MappingError(
                f"{self.name} mapper: ids must be a 1-d int64 array, got {ids.dtype} with shape {ids.shape}"
            )
        return ids

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_bytes() == self.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rows={self.rows}, {self.state()[0]})"


_REGISTRY: dict[str, type[IdMapper]] = {}


def register_mapper(name: str, cls: type[IdMapper]) -> None:
    """Register ``cls`` under ``name`` (must equal ``cls.name``). Registering the same class
    again is a no-op; another class under a taken name is a MappingError."""
    if not (isinstance(cls, type) and issubclass(cls, IdMapper)):
        raise MappingError(f"register_mapper({name!r}): {cls!r} is not an IdMapper subclass")
    if cls.name != name:
        raise MappingError(f"register_mapper({name!r}): the class's name attribute is {cls.name!r}; make them equal")
    old = _REGISTRY.get(name)
    if old is not None and old is not cls:
        raise MappingError(f"mapper name {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _REGISTRY[name] = cls


def registered_mappers() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _lookup_class(name: str) -> type[IdMapper]:
    if name not in _REGISTRY:
        _import_builtin_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MappingError(
            f"unknown id mapper {name!r}; registered: {', '.join(registered_mappers())}. "
            "Import the module that calls register_mapper for it first."
        ) from None


def _import_builtin_plugins() -> None:
    # Learned mappers live in transforms/learned_*.py and register on import; import them
    # lazily so loading a stored set works without the caller knowing which module to import.
    import importlib
    import pkgutil

    import transforms

    for info in pkgutil.iter_modules(transforms.__path__):
        if info.name.startswith("learned_"):
            importlib.import_module(f"transforms.{info.name}")


def make_mapper(name: str, rows: int, **params: Any) -> IdMapper:
    """A new mapper of registered kind ``name`` with ``rows`` rows (config entry point)."""
    cls = _lookup_class(name)
    try:
        return cls(rows, **params)
    except TypeError as exc:
        raise MappingError(f"mapper {name!r}: bad parameters {sorted(params)}: {exc}") from None


def load_mapper(data: bytes) -> IdMapper:
    """Rebuild a mapper from ``IdMapper.to_bytes()`` output (see the module docstring)."""
    data = bytes(data)
    if not data.startswith(MAPPER_MAGIC):
        raise MappingError(f"not an id-mapper blob: magic {data[:8]!r}, expected {MAPPER_MAGIC!r}")
    if len(data) < len(MAPPER_MAGIC) + 4:
        raise MappingError("id-mapper blob truncated in its header")
    (hlen,) = _U32.unpack_from(data, len(MAPPER_MAGIC))
    start = len(MAPPER_MAGIC) + 4
    try:
        header = json.loads(data[start:start + hlen])
    except ValueError as exc:
        raise MappingError(f"id-mapper blob has a corrupt header: {exc}") from None
    cls = _lookup_class(header["name"])
    if header["version"] > cls.version:
        raise MappingError(
            f"mapper {cls.name!r} blob has format version {header['version']}, this code reads up "
            f"to {cls.version}; upgrade headrace"
        )
    body = data[start + hlen:]
    expected = sum(m["nbytes"] for m in header["arrays"])
    if len(body) != expected:
        raise MappingError(f"mapper {cls.name!r} blob truncated: {len(body)} array bytes, expected {expected}")
    if zlib.crc32(body) != header["crc32"]:
        raise MappingError(f"mapper {cls.name!r} blob is corrupt (checksum mismatch)")
    arrays, pos = {}, 0
    for m in header["arrays"]:
        arr = np.frombuffer(body, dtype=np.dtype(m["dtype"]), count=int(np.prod(m["shape"], dtype=np.int64)),
                            offset=pos).reshape(m["shape"])
        arrays[m["name"]] = arr
        pos += m["nbytes"]
    mapper = cls.from_state(int(header["rows"]), header["params"], arrays, int(header["version"]))
    if mapper.lookups != header["lookups"]:
        raise MappingError(f"mapper {cls.name!r}: stored lookups {header['lookups']} != {mapper.lookups}")
    return mapper


# ---------------------------------------------------------------------------- built-ins

_FIB = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@numba.njit(cache=True, nogil=True)
def _modulo_kernel(ids, rows):
    out = np.empty(ids.shape[0], dtype=np.int64)
    r = np.uint64(rows)
    for i in range(ids.shape[0]):
        out[i] = np.int64(np.uint64(ids[i]) % r)
    return out


@numba.njit(cache=True, nogil=True)
def _double_kernel(ids, rows, seed):
    out = np.empty((2, ids.shape[0]), dtype=np.int64)
    half = rows // 2
    r0 = np.uint64(half)
    r1 = np.uint64(rows - half)
    s = np.uint64(seed)
    for i in range(ids.shape[0]):
        u = np.uint64(ids[i])
        out[0, i] = np.int64(u % r0)
        z = (u ^ s) + _FIB
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
        out[1, i] = half + np.int64(z % r1)
    return out


class ModuloMapper(IdMapper):
    """The hashing trick: ``row = uint64(id) % rows``. Ids from ``transforms.hashing`` are
    already mixed, so the low bits are uniform and no extra hashing is needed."""

    name = "modulo"
    version = 1

    def map(self, ids: np.ndarray) -> np.ndarray:
        return _modulo_kernel(self.check_ids(ids), self.rows)

    def state(self):
        return {}, {}

    @classmethod
    def from_state(cls, rows, params, arrays, version):
        return cls(rows)


class DoubleHashMapper(IdMapper):
    """Two rows per id (``lookups = 2``), summed by the embedding bag: ``uint64(id) % h`` in
    the first half ``[0, h)`` and ``h + splitmix64(uint64(id) ^ seed) % (rows - h)`` in the
    second, with ``h = rows // 2``. Two ids share both rows only with probability about
    4/rows**2 (the "double hashing" compression baseline; same memory as modulo)."""

    name = "double"
    version = 2  # 1 hashed both lookups over the whole table
    lookups = 2

    def __init__(self, rows: int, *, seed: int = 0x5F3759DF):
        super().__init__(rows)
        if rows < 2:
            raise MappingError(f"double mapper: needs rows >= 2 (two half-size ranges), got {rows}")
        if not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise MappingError(f"double mapper: seed must be an int in [0, 2**64), got {seed!r}")
        self.seed = seed

    def map(self, ids: np.ndarray) -> np.ndarray:
        return _double_kernel(self.check_ids(ids), self.rows, self.seed)

    def state(self):
        return {"seed": self.seed}, {}

    @classmethod
    def from_state(cls, rows, params, arrays, version):
        return cls(rows, seed=int(params["seed"]))


register_mapper(ModuloMapper.name, ModuloMapper)
register_mapper(DoubleHashMapper.name, DoubleHashMapper)


# ---------------------------------------------------------------------------- sets

@dataclasses.dataclass(frozen=True, eq=False)
class MappingSet:
    """One mapper per sparse feature plus one version for the whole set.

    Versions only grow: a re-fit publishes ``version + 1`` (``MappingStore.save``); batches record
    the version their rows were produced with (``ProcessedBatch.mapping_version``).
    """

    version: int
    mappers: Mapping[str, IdMapper]

    def __post_init__(self):
        if not isinstance(self.version, int) or self.version < 0:
            raise MappingError(f"mapping set version must be an int >= 0, got {self.version!r}")
        for feat, m in self.mappers.items():
            if not isinstance(m, IdMapper):
                raise MappingError(f"mapping set: feature {feat!r} maps to {m!r}, not an IdMapper")
        object.__setattr__(self, "mappers", types.MappingProxyType(dict(self.mappers)))

    def __getitem__(self, feature: str) -> IdMapper:
        try:
            return self.mappers[feature]
        except KeyError:
            raise MappingError(
                f"mapping set v{self.version} has no mapper for feature {feature!r} "
                f"(it has {sorted(self.mappers)}); re-fit or delete the stale mappings directory"
            ) from None

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, MappingSet) and other.version == self.version
                and dict(other.mappers) == dict(self.mappers))

    def __hash__(self) -> int:
        return hash((self.version, tuple(sorted(self.mappers))))

    def __reduce__(self):
        return (_set_from_bytes, (self.to_bytes(),))

    @classmethod
    def default(cls, schema, mapper: str = "modulo") -> "MappingSet":
        """``mapper`` (registered name) for each sparse feature of ``schema`` with its
        configured rows, version 0."""
        return cls(0, {s.name: make_mapper(mapper, s.rows) for s in schema.sparse})

    def check_schema(self, schema) -> None:
        """MappingError unless every sparse feature has a mapper with the configured rows."""
        for s in schema.sparse:
            m = self[s.name]
            if m.rows != s.rows:
                raise MappingError(
                    f"mapping set v{self.version}: feature {s.name!r} maps into {m.rows} rows but "
                    f"schema.sparse rows = {s.rows}; re-fit the mapping for the new table size"
                )

    def to_bytes(self) -> bytes:
        blobs = {feat: m.to_bytes() for feat, m in sorted(self.mappers.items())}
        header = json.dumps({"version": self.version,
                             "features": [[f, len(b)] for f, b in blobs.items()]}).encode()
        return SET_MAGIC + _U32.pack(len(header)) + header + b"".join(blobs.values())

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "<bytes>") -> "MappingSet":
        """The set ``to_bytes`` wrote; MappingError naming ``where`` (e.g. the file) if
        ``data`` is not one."""
        return _set_from_bytes(data, where)


def _set_from_bytes(data: bytes, where: str = "<bytes>") -> MappingSet:
    data = bytes(data)
    if not data.startswith(SET_MAGIC):
        raise MappingError(f"{where}: not a mapping set: magic {data[:8]!r}, expected {SET_MAGIC!r}")
    (hlen,) = _U32.unpack_from(data, len(SET_MAGIC))
    pos = len(SET_MAGIC) + 4
    try:
        header = json.loads(data[pos:pos + hlen])
    except ValueError as exc:
        raise MappingError(f"{where}: corrupt mapping-set header: {exc}") from None
    pos += hlen
    mappers = {}
    for feat, n in header["features"]:
        if pos + n > len(data):
            raise MappingError(f"{where}: truncated at feature {feat!r}")
        mappers[feat] = load_mapper(data[pos:pos + n])
        pos += n
    if pos != len(data):
        raise MappingError(f"{where}: {len(data) - pos} trailing bytes after the last mapper")
    return MappingSet(int(header["version"]), mappers)
