"""Table-driven id mappers: ``frequency`` (hot ids own rows) and ``learned`` ("Learning to
Collide": hot ids own rows, the rest share rows by cluster of similar ids).

Both are an id -> row table (``transforms.hash_kernels.IdTable``, open addressing, one
cache line per probe) plus a *fallback range* ``[fallback_base, fallback_base +
fallback_rows)`` into which every id absent from the table is hashed with
``hash_kernels.hash_rows(ids, seed, ...)``. They differ only in what the table holds and
how it was fitted (``transforms.hash_fit``):

* ``FrequencyMapper``: the table holds the most frequent ids, rows ``[0, hot)``, one id
  per row; every other id (seen at fit time or not) is hashed into ``[hot, rows)``.
* ``LearnedMapper``: the table holds every id seen at fit time. Hot ids own rows
  ``[0, hot)``; the other seen ids share rows ``[hot, hot + clusters)``, one row per
  cluster of similar ids; ids never seen at fit time are hashed into the reserved range
  ``[hot + clusters, rows)``.

``map`` is a pure function of the id array (same ids -> same rows), needs one lookup per
id (``lookups = 1``), accepts any int64 including both extremes, and returns int64 rows in
``[0, rows)``. The stored state is the (key, row) pairs in insertion order, most accessed
ids first (as the fits emit them); the table is rebuilt on load by inserting them in that
order, so the hottest ids sit in their home slots (one probe) and a stored mapping
rebuilds the identical table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from transforms.errors import MappingError
from transforms.hash_kernels import IdTable, build_table, table_lookup
from transforms.mappers import IdMapper, register_mapper

__all__ = ["TableMapper", "FrequencyMapper", "LearnedMapper", "DEFAULT_FALLBACK_SEED"]

DEFAULT_FALLBACK_SEED = 0x2545F4914F6CDD1D


class TableMapper(IdMapper):
    """An explicit id -> row table plus a hashed fallback range for ids not in it.

    ``keys``: distinct int64 ids, most accessed first (insertion order; see the module
    docstring); ``values``: their rows (int64, in ``[0, rows)`` and outside the fallback
    range); ids not in ``keys`` map to ``fallback_base +
    H(id) mod fallback_rows``. ``hot`` is the number of rows ``[0, hot)`` owned by one id
    each (informational for reports and migration).
    """

    version = 1

    def __init__(self, rows: int, *, keys: np.ndarray, values: np.ndarray, hot: int,
                 fallback_base: int, fallback_rows: int, seed: int = DEFAULT_FALLBACK_SEED):
        super().__init__(rows)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=np.int64)
        if keys.ndim != 1 or keys.shape != values.shape:
            raise MappingError(f"{self.name} mapper: keys and values must be equal-length 1-d arrays, "
                               f"got {keys.shape} and {values.shape}")
        if not (0 <= fallback_base and 1 <= fallback_rows and fallback_base + fallback_rows <= self.rows):
            raise MappingError(
                f"{self.name} mapper: fallback range [{fallback_base}, {fallback_base + fallback_rows}) "
                f"must be a non-empty part of [0, {self.rows}); give unseen ids at least one row"
            )
        if not 0 <= hot <= self.rows:
            raise MappingError(f"{self.name} mapper: hot = {hot} must be in [0, {self.rows}]")
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 1 << 64:
            raise MappingError(f"{self.name} mapper: seed must be an int in [0, 2**64), got {seed!r}")
        if values.size:
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= self.rows:
                raise MappingError(f"{self.name} mapper: table rows span [{lo}, {hi}], outside [0, {self.rows})")
            inside = (values >= fallback_base) & (values < fallback_base + fallback_rows)
            if inside.any():
                raise MappingError(
                    f"{self.name} mapper: id {int(keys[np.argmax(inside)])} maps to row "
                    f"{int(values[np.argmax(inside)])} inside the fallback range; fitted rows and "
                    "the fallback range must be disjoint"
                )
        # Insertion order is lookup speed: with linear probing the first keys inserted sit
        # in their home slot (one probe), so the fits pass the most accessed ids first.
        self.keys = keys
        self.values = values
        self.hot = int(hot)
        self.fallback_base = int(fallback_base)
        self.fallback_rows = int(fallback_rows)
        self.seed = int(seed)
        self.table: IdTable = build_table(self.keys, self.values)

    @property
    def entries(self) -> int:
        """Ids held by the table."""
        return int(self.keys.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory of the lookup structure (the table's slot array)."""
        return self.table.nbytes

    def map(self, ids: np.ndarray) -> np.ndarray:
        return table_lookup(self.table, self.check_ids(ids), self.seed, self.fallback_base, self.fallback_rows)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {"hot": self.hot, "fallback_base": self.fallback_base,
                  "fallback_rows": self.fallback_rows, "seed": self.seed}
        return params, {"keys": self.keys, "values": self.values}

    @classmethod
    def from_state(cls, rows, params, arrays, version):
        try:
            return cls(rows, keys=arrays["keys"], values=arrays["values"], hot=int(params["hot"]),
                       fallback_base=int(params["fallback_base"]),
                       fallback_rows=int(params["fallback_rows"]), seed=int(params["seed"]))
        except KeyError as exc:
            raise MappingError(f"{cls.name} mapper blob lacks {exc.args[0]!r}") from None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rows={self.rows}, entries={self.entries}, hot={self.hot}, "
                f"fallback=[{self.fallback_base}, {self.fallback_base + self.fallback_rows}))")


class FrequencyMapper(TableMapper):
    """Frequency-based hashing: the ``hot`` most frequent ids own rows ``[0, hot)``; every
    other id is hashed into ``[hot, rows)``. Built by ``hash_fit.fit_frequency``."""

    name = "frequency"

    def __init__(self, rows: int, *, keys: np.ndarray, values: np.ndarray, hot: int | None = None,
                 fallback_base: int | None = None, fallback_rows: int | None = None,
                 seed: int = DEFAULT_FALLBACK_SEED):
        n = int(np.asarray(keys).shape[0])
        hot = n if hot is None else hot
        fallback_base = hot if fallback_base is None else fallback_base
        fallback_rows = rows - fallback_base if fallback_rows is None else fallback_rows
        super().__init__(rows, keys=keys, values=values, hot=hot, fallback_base=fallback_base,
                         fallback_rows=fallback_rows, seed=seed)


class LearnedMapper(TableMapper):
    """The learned mapping: hot ids own rows ``[0, hot)``, other seen ids share cluster rows
    ``[hot, fallback_base)``, unseen ids hash into ``[fallback_base, rows)``. Built by
    ``hash_fit.fit_learned``."""

    name = "learned"


register_mapper(FrequencyMapper.name, FrequencyMapper)
register_mapper(LearnedMapper.name, LearnedMapper)
