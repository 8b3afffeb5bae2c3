"""Count-min sketch over int64 ids with two weights per id (access count and label sum).

Bounded memory for the tail of the id distribution: ``depth`` rows of ``width`` float64
cells per weight. ``query`` never under-estimates a weight that was only ever added with
non-negative values; it over-estimates by at most ``e * total / width`` with probability
``1 - exp(-depth)`` (Cormode & Muthukrishnan). Pure numpy/Numba, no I/O; serialisable
with ``to_bytes`` / ``from_bytes``. Row ``j`` hashes with ``hash_kernels.mix64(id,
seed + j)`` reduced to the width, so two sketches of equal shape and seed can be merged
by adding their cells.
"""

from __future__ import annotations

import struct

import numba
import numpy as np

from transforms.errors import MappingError
from transforms.hash_kernels import mix64, reduce_range

__all__ = ["CountMinSketch"]

_HEADER = struct.Struct("<8sIIQ")
_MAGIC = b"HRCMS001"
_SEED = 0x51ED270B27A4F1F3


@numba.njit(nogil=True, cache=True)
def _add(cells, ids, w0, w1, seed):
    depth, width = cells.shape[1], cells.shape[2]
    wd = np.uint64(width)
    for j in range(depth):
        s = np.uint64(seed + j)
        for i in range(ids.shape[0]):
            c = np.int64(reduce_range(mix64(ids[i], s), wd))
            cells[0, j, c] += w0[i]
            cells[1, j, c] += w1[i]


@numba.njit(nogil=True, cache=True)
def _query(cells, ids, seed, out):
    depth, width = cells.shape[1], cells.shape[2]
    wd = np.uint64(width)
    for i in range(ids.shape[0]):
        best = np.inf
        bestj, bestc = 0, 0
        for j in range(depth):
            c = np.int64(reduce_range(mix64(ids[i], np.uint64(seed + j)), wd))
            if cells[0, j, c] < best:
                best = cells[0, j, c]
                bestj, bestc = j, c
        out[0, i] = best
        # the label sum is read from the same cell as the minimal count, so the
        # estimated rate stays in [0, 1] for 0/1 labels
        out[1, i] = cells[1, bestj, bestc]


class CountMinSketch:
    """A count-min sketch of (count, label_sum) per id. Not thread-safe for writers."""

    def __init__(self, width: int = 1 << 16, depth: int = 4, seed: int = _SEED,
                 cells: np.ndarray | None = None):
        if width < 1 or depth < 1 or width >= 1 << 32:
            raise MappingError(f"count-min sketch: width must be in [1, 2**32) and depth >= 1, got {width}, {depth}")
        if not 0 <= seed < (1 << 64) - depth:
            raise MappingError(f"count-min sketch: seed must be in [0, 2**64 - depth), got {seed}")
        self.width, self.depth, self.seed = int(width), int(depth), int(seed)
        if cells is None:
            cells = np.zeros((2, depth, width), dtype=np.float64)
        if cells.shape != (2, depth, width) or cells.dtype != np.float64:
            raise MappingError(f"count-min sketch cells have shape {cells.shape}/{cells.dtype}, "
                               f"expected {(2, depth, width)}/float64")
        self.cells = np.ascontiguousarray(cells)

    @property
    def nbytes(self) -> int:
        return int(self.cells.nbytes)

    def add(self, ids: np.ndarray, counts: np.ndarray, label_sums: np.ndarray) -> None:
        """Add per-id weights (arrays of equal length; ids may repeat)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        counts = np.ascontiguousarray(counts, dtype=np.float64)
        label_sums = np.ascontiguousarray(label_sums, dtype=np.float64)
        if not ids.shape == counts.shape == label_sums.shape:
            raise MappingError("count-min sketch: ids, counts and label_sums must have equal shapes")
        _add(self.cells, ids, counts, label_sums, np.uint64(self.seed))

    def query(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Estimated (counts, label_sums) of ``ids`` (float64 arrays)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((2, ids.shape[0]), dtype=np.float64)
        _query(self.cells, ids, np.uint64(self.seed), out)
        return out[0], out[1]

    def total(self) -> float:
        """Total count added (exact: every row sums to it)."""
        return float(self.cells[0, 0].sum())

    def merge(self, other: "CountMinSketch") -> None:
        if (other.width, other.depth, other.seed) != (self.width, self.depth, self.seed):
            raise MappingError("count-min sketches of different shape or seed cannot be merged")
        self.cells += other.cells

    def to_bytes(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.width, self.depth, self.seed) + self.cells.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "CountMinSketch":
        data = bytes(data)
        if len(data) < _HEADER.size or data[:8] != _MAGIC:
            raise MappingError(f"not a count-min sketch blob (magic {data[:8]!r})")
        _, width, depth, seed = _HEADER.unpack_from(data)
        body = data[_HEADER.size:]
        if len(body) != 2 * depth * width * 8:
            raise MappingError(f"count-min sketch blob truncated: {len(body)} bytes for {depth}x{width}")
        cells = np.frombuffer(body, dtype=np.float64).reshape(2, depth, width).copy()
        return cls(width, depth, seed, cells)
