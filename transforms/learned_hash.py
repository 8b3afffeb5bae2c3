"""Table-driven id mappers: ``frequency`` (hot ids own rows) and ``learned`` ("Learning to
Collide": hot ids own rows, the rest share rows by cluster of similar ids).

Both are an exact id -> row table (``transforms.hash_kernels.IdTable``: 64-byte buckets,
one cache line per lookup), optional *bucket codes* (a compact id -> row map with
collisions: one small integer per hash bucket of ids, no keys) and a *fallback range*
``[fallback_base, fallback_base + fallback_rows)`` into which every other id is hashed with
``hash_kernels.hash_rows(ids, seed, ...)``. They differ only in what they hold and how
they were fitted (``transforms.hash_fit``):

* ``FrequencyMapper``: the table holds the most frequent ids, rows ``[0, hot)``, one id
  per row; every other id (seen at fit time or not) is hashed into ``[hot, rows)``.
* ``LearnedMapper``: hot ids own rows ``[0, hot)``; the other seen ids share rows
  ``[hot, hot + clusters)``, one row per cluster of similar ids, through the table (every
  seen id stored: exact) or, when the fit was given a memory budget, through bucket codes
  (ids sharing a code bucket share its cluster); ids never seen at fit time are hashed into
  the reserved range ``[hot + clusters, rows)`` (or take an occupied code bucket's row).

``map`` is a pure function of the id array (same ids -> same rows), needs one lookup per
id (``lookups = 1``), accepts any int64 including both extremes, and returns int64 rows in
``[0, rows)``: the table's row when the id is stored, else the code's row when its code
bucket has one, else the fallback hash.

Stored state (format version 2): the table's bucket array itself (``table``, so loading
rebuilds nothing and the hottest ids stay in their home buckets), ``codes`` and the
parameters. Version 1 (``HRIDMAP1`` blobs written before this layout: ``keys`` and int64
``values`` in insertion order, most accessed first) still loads: the table is rebuilt by
inserting the pairs in that order, and maps every id exactly as version 1 did.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from transforms.errors import MappingError
from transforms.hash_kernels import (
    NO_CODES,
    IdTable,
    build_table,
    table_from_words,
    table_lookup,
)
from transforms.mappers import IdMapper, load_mapper, register_mapper

__all__ = ["TableMapper", "FrequencyMapper", "LearnedMapper", "DEFAULT_FALLBACK_SEED", "DEFAULT_CODE_SEED",
           "code_dtype"]

DEFAULT_FALLBACK_SEED = 0x2545F4914F6CDD1D
DEFAULT_CODE_SEED = 0x6A09E667F3BCC909


def code_dtype(rows: int) -> np.dtype:
    """The smallest unsigned dtype holding codes ``0..rows`` (0 = "no row")."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if rows <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise MappingError(f"bucket codes address at most {np.iinfo(np.uint32).max} rows, got {rows}")


class TableMapper(IdMapper):
    """An exact id -> row table, optional bucket codes, and a hashed fallback range.

    ``keys``: distinct int64 ids, most accessed first (insertion order: the first ids
    inserted sit in their home bucket, one cache line per lookup); ``values``: their rows
    (in ``[0, rows)``, outside the fallback range). ``codes``: unsigned ints, one per code
    bucket; an id absent from the table with a non-zero code ``c`` maps to ``code_base + c -
    1``. Every other id maps to ``fallback_base + H(id) mod fallback_rows``. ``hot`` is the
    number of rows ``[0, hot)`` owned by one id each (informational for reports and
    migration).
    """

    version = 2  # 1: keys + int64 values, table rebuilt on load; 2: the table's buckets, codes

    def __init__(self, rows: int, *, keys: np.ndarray, values: np.ndarray, hot: int,
                 fallback_base: int, fallback_rows: int, seed: int = DEFAULT_FALLBACK_SEED,
                 codes: np.ndarray | None = None, code_seed: int = DEFAULT_CODE_SEED, code_base: int = 0):
        super().__init__(rows)
        keys = np.asarray(keys)
        values = np.asarray(values)
        if keys.ndim != 1 or keys.shape != values.shape:
            raise MappingError(f"{self.name} mapper: keys and values must be equal-length 1-d arrays, "
                               f"got {keys.shape} and {values.shape}")
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise MappingError(f"{self.name} mapper: values must be integer rows, got {values.dtype}")
        self._set_ranges(hot, fallback_base, fallback_rows, seed)
        self._check_rows(values, lambda i: int(keys[i]))
        self._set(build_table(keys, values), hot, seed, codes, code_seed, code_base)

    # -- construction helpers (shared by __init__ and from_state)

    def _set_ranges(self, hot: int, fallback_base: int, fallback_rows: int, seed: int) -> None:
        """Check the fallback range, ``hot`` and ``seed``; set the fallback range."""
        if not (0 <= fallback_base and 1 <= fallback_rows and fallback_base + fallback_rows <= self.rows):
            raise MappingError(
                f"{self.name} mapper: fallback range [{fallback_base}, {fallback_base + fallback_rows}) "
                f"must be a non-empty part of [0, {self.rows}); give unseen ids at least one row"
            )
        if not 0 <= hot <= self.rows:
            raise MappingError(f"{self.name} mapper: hot = {hot} must be in [0, {self.rows}]")
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 1 << 64:
            raise MappingError(f"{self.name} mapper: seed must be an int in [0, 2**64), got {seed!r}")
        self.fallback_base, self.fallback_rows = int(fallback_base), int(fallback_rows)

    def _check_rows(self, rows: np.ndarray, key_of) -> None:
        """MappingError unless every row is in ``[0, rows)`` and outside the fallback range;
        ``key_of(i)`` names the id of ``rows[i]``."""
        if not rows.size:
            return
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= self.rows:
            raise MappingError(f"{self.name} mapper: table rows span [{lo}, {hi}], outside [0, {self.rows})")
        inside = (rows >= self.fallback_base) & (rows < self.fallback_base + self.fallback_rows)
        if inside.any():
            i = int(np.argmax(inside))
            raise MappingError(
                f"{self.name} mapper: id {key_of(i)} maps to row {int(rows[i])} inside the fallback range; "
                "fitted rows and the fallback range must be disjoint"
            )

    def _set(self, table: IdTable, hot: int, seed: int, codes: np.ndarray | None, code_seed: int,
             code_base: int) -> None:
        codes = NO_CODES if codes is None else np.asarray(codes)
        if codes.ndim != 1 or codes.dtype not in (np.uint8, np.uint16, np.uint32) or codes.size >= 2**32:
            raise MappingError(f"{self.name} mapper: codes must be a 1-d uint8/16/32 array of < 2**32 "
                               f"buckets, got {codes.dtype} {codes.shape}")
        if not isinstance(code_seed, (int, np.integer)) or not 0 <= int(code_seed) < 1 << 64:
            raise MappingError(f"{self.name} mapper: code_seed must be an int in [0, 2**64), got {code_seed!r}")
        if codes.size:
            top = int(codes.max())
            if top and not 0 <= code_base <= code_base + top - 1 < self.rows:
                raise MappingError(f"{self.name} mapper: code rows [{code_base}, {code_base + top - 1}] "
                                   f"outside [0, {self.rows})")
            if top and code_base < self.fallback_base + self.fallback_rows and self.fallback_base < code_base + top:
                raise MappingError(f"{self.name} mapper: code rows [{code_base}, {code_base + top - 1}] overlap "
                                   "the fallback range; fitted rows and the fallback range must be disjoint")
        self.table = table
        self.hot = int(hot)
        self.seed = int(seed)
        self.codes = np.ascontiguousarray(codes)
        self.code_seed = int(code_seed)
        self.code_base = int(code_base)

    # -- the mapper

    @property
    def entries(self) -> int:
        """Ids held by the table."""
        return self.table.entries

    @property
    def keys(self) -> np.ndarray:
        """The table's ids (int64, slot order)."""
        return self.table.items()[0]

    @property
    def values(self) -> np.ndarray:
        """The table's rows (int64), aligned with ``keys``."""
        return self.table.items()[1]

    @property
    def nbytes(self) -> int:
        """Memory of the lookup structures: the table's buckets plus the bucket codes."""
        return self.table.nbytes + int(self.codes.nbytes)

    def map(self, ids: np.ndarray) -> np.ndarray:
        return table_lookup(self.table, self.check_ids(ids), self.seed, self.fallback_base, self.fallback_rows,
                            self.codes, self.code_seed, self.code_base)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {"hot": self.hot, "fallback_base": self.fallback_base, "fallback_rows": self.fallback_rows,
                  "seed": self.seed, "sentinel_row": self.table.sentinel_row, "code_seed": self.code_seed,
                  "code_base": self.code_base}
        return params, {"table": self.table.words, "codes": self.codes}

    @classmethod
    def from_state(cls, rows, params, arrays, version):
        try:
            if version == 1:
                return cls._from_v1(rows, params, arrays)
            self = cls.__new__(cls)
            IdMapper.__init__(self, rows)
            self._set_ranges(int(params["hot"]), int(params["fallback_base"]), int(params["fallback_rows"]),
                               int(params["seed"]))
            table = table_from_words(arrays["table"], int(params["sentinel_row"]))
            keys, values = table.items()
            self._check_rows(values, lambda i: int(keys[i]))
            self._set(table, int(params["hot"]), int(params["seed"]), arrays["codes"], int(params["code_seed"]),
                      int(params["code_base"]))
            return self
        except KeyError as exc:
            raise MappingError(f"{cls.name} mapper blob (format version {version}) lacks {exc.args[0]!r}") from None

    @classmethod
    def _from_v1(cls, rows, params, arrays):
        """A version-1 state: (key, row) pairs in insertion order, rebuilt into the current
        table by inserting them in that order (same rows for every id as version 1)."""
        return cls(rows, keys=arrays["keys"], values=arrays["values"], hot=int(params["hot"]),
                   fallback_base=int(params["fallback_base"]), fallback_rows=int(params["fallback_rows"]),
                   seed=int(params["seed"]))

    def __reduce__(self):
        # through the byte format: a copy keeps the table's cache-line alignment
        return (load_mapper, (self.to_bytes(),))

    def __repr__(self) -> str:
        codes = f", codes={self.codes.size}x{self.codes.dtype}" if self.codes.size else ""
        return (f"{type(self).__name__}(rows={self.rows}, entries={self.entries}, hot={self.hot}{codes}, "
                f"fallback=[{self.fallback_base}, {self.fallback_base + self.fallback_rows}))")


class FrequencyMapper(TableMapper):
    """Frequency-based hashing: the ``hot`` most frequent ids own rows ``[0, hot)``; every
    other id is hashed into ``[hot, rows)``. Built by ``hash_fit.fit_frequency``."""

    name = "frequency"

    def __init__(self, rows: int, *, keys: np.ndarray, values: np.ndarray, hot: int | None = None,
                 fallback_base: int | None = None, fallback_rows: int | None = None,
                 seed: int = DEFAULT_FALLBACK_SEED, **codes: Any):
        n = int(np.asarray(keys).shape[0])
        hot = n if hot is None else hot
        fallback_base = hot if fallback_base is None else fallback_base
        fallback_rows = rows - fallback_base if fallback_rows is None else fallback_rows
        super().__init__(rows, keys=keys, values=values, hot=hot, fallback_base=fallback_base,
                         fallback_rows=fallback_rows, seed=seed, **codes)


class LearnedMapper(TableMapper):
    """The learned mapping: hot ids own rows ``[0, hot)``, other seen ids share cluster rows
    ``[hot, fallback_base)`` (through the table or bucket codes), unseen ids hash into
    ``[fallback_base, rows)``. Built by ``hash_fit.fit_learned``."""

    name = "learned"


register_mapper(FrequencyMapper.name, FrequencyMapper)
register_mapper(LearnedMapper.name, LearnedMapper)
