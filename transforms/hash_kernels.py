"""Numba kernels shared by the id mappers: 64-bit mixers, range reduction, an id -> row
table with one cache line per lookup, and the bucket codes of compact learned mappings.

Everything here is a pure function of its arguments (no global state), compiled with
``nogil=True`` so callers may run it from several threads, and ``parallel=False`` because
the ingest path already runs one batch per worker.

Hashing contract (stored mappings depend on it; never change the constants):

* ``mix64(x, seed)`` is the splitmix64 finaliser of ``x ^ seed`` (a bijection on 64 bits).
* ``reduce_range(h, n)`` maps a 64-bit hash to ``[0, n)`` with Lemire's multiply-shift on
  the top 32 bits (``((h >> 32) * n) >> 32``): no division, uniform to within 2**-32 for
  ``n < 2**32``.
* ``hash_rows(ids, seed, base, n)`` = ``base + reduce_range(mix64(id, seed), n)``.
* An id's home bucket in a table of ``B`` buckets is ``reduce_range(uint64(id) * FIB, B)``
  (Fibonacci multiply, then the multiply-shift reduction).

The table (``IdTable``) is an array of 64-byte buckets, one cache line each, aligned to
64 bytes: five int64 keys, then six uint32 words holding the five keys' rows and the
bucket's *miss word*. A key lives in its home bucket or, when that is full, in the next
bucket with a free slot (linear probing by bucket, wrapping at the end); slots fill front
to back. The miss word is ``ABSENT`` unless some key homed in the bucket spilled past it
(then ``NO_ROW``), so an absent id costs one cache line, like a present one. Load factor
is at most ``MAX_LOAD`` (0.5: 25.6 bytes per id; version 1 of the mapper format, a
power-of-two table of 16-byte slots at load <= 0.5, spent 32-64).

A lookup is one pass over the ids:

1. prefetch the home bucket of the id ``PREFETCH_DISTANCE`` places ahead (tables over
   ``PREFETCH_MIN_BYTES``), so many cache misses are in flight at once instead of one;
2. compare the id with all eight words of its home bucket in one vector instruction and
   take the lowest matching key slot, or the miss word when no key matches: which slot
   matches is unpredictable, so there is no branch on it to mispredict;
3. only for a miss word (absent ids, spilled keys, the marker id below; on the benchmark's
   uniform traffic ~8% of ids: the 5% it never stored and 2.7% spilled keys): probe on,
   then the bucket codes, then the fallback hash.

Measured against version 1's kernel in the same process (``bench/remap.py``'s workloads,
batches of 65,536, one core, 2-core shared machine): 1M ids 1.3x on Zipf(1.05) traffic and
1.6x on uniform ids; 100k ids 1.1x and 1.4x; 5k ids (in L2) 1.0x and 1.3x.

Tried against this kernel and not kept (1M ids, uniform / Zipf, same process, each batch's
best of 20-50 interleaved passes): prefetch distance 16-256 or prefetcht1/t2/nta (0.7-1.0x);
buckets hashed once into a ring, or in groups of 16-64 hashed then probed (0.5-1.0x); rare
ids deferred to a second pass or compacted into lists (0.8-1.05x / 0.7-0.95x); every id's
fallback row computed up front, vectorised, so absent ids take no branch (1.0x / 0.8x); a
vector compare in the spill probe; the next bucket prefetched when the home one spilled
(0.7-0.9x); kernels without the code and marker branches (1.0x); 2 MiB pages (1.0x). An id
that takes the rare path costs ~30 ns (its branch mispredicts after a long dependency
chain; a spilled key adds a second line); without it the loop would run 1.3x faster. A
lower ``MAX_LOAD`` trades memory for it: 0.4 (32 B/id) measured 1.11x / 1.04x, 0.3 no more.

``EMPTY_KEY`` (int64 min) marks a free slot; when that value is itself a key, its row is
kept aside in ``sentinel_row``. Rows in the table are below ``ABSENT`` (2**32 - 2).

*Bucket codes* (``codes``, uint8/16/32, may be empty) are a compact id -> row map with
collisions: an id absent from the table takes ``codes[reduce_range(mix64(id, code_seed),
len(codes))]``; code ``c > 0`` means row ``code_base + c - 1``, code 0 "no row", after which
the id is hashed into the fallback range. One or two bytes per bucket instead of ~26 per id.
"""

from __future__ import annotations

import dataclasses
import math

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from transforms.errors import MappingError

__all__ = [
    "EMPTY_KEY", "NO_ROW", "ABSENT", "BUCKET_KEYS", "BUCKET_BYTES", "MAX_LOAD", "mix64", "reduce_range",
    "hash_rows", "hash_rows_into", "IdTable", "build_table", "table_from_words", "table_buckets",
    "table_nbytes", "table_entries_within", "table_lookup", "table_lookup_into", "NO_CODES",
]

EMPTY_KEY = np.int64(np.iinfo(np.int64).min)
#: Row word of a free slot, and the miss word of a bucket some key homed there spilled past.
NO_ROW = 0xFFFFFFFF
#: The miss word of a bucket no key spilled past: an id not in it is in no bucket.
ABSENT = 0xFFFFFFFE
BUCKET_KEYS = 5
BUCKET_BYTES = 64
_WORDS = BUCKET_BYTES // 8  # int64 words per bucket
_ROW0 = 2 * BUCKET_KEYS  # uint32 index of the first row word inside a bucket
_MISS = _ROW0 + BUCKET_KEYS  # uint32 index of the miss word (ABSENT or NO_ROW)
#: Highest share of slots filled. At 0.5, 2.7% of uniformly drawn keys sit past their
#: home bucket (5% at 0.6, 10.5% at 0.75) and pay a second cache line and a mispredicted
#: branch; 0.6-0.75 measured 0.5-0.9x the uniform throughput of 0.5 on a 1M-id table.
MAX_LOAD = 0.5
#: Ids ahead whose home bucket is prefetched: enough cache misses in flight to hide memory
#: latency, few enough that the lines are still in L1 when used (64 measured 5-10% above
#: 32 on Zipf traffic, 16 ~15% below; 128 no better).
PREFETCH_DISTANCE = 64
#: Tables up to this size are not prefetched: they live in L2, and the prefetch's
#: instructions would cost more than the misses they hide.
PREFETCH_MIN_BYTES = 256 * 1024
#: The empty code array (mappers without bucket codes).
NO_CODES = np.zeros(0, dtype=np.uint8)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_FIB = np.uint64(0x9E3779B97F4A7C15)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_NO_ROW = np.int64(NO_ROW)
_ABSENT = np.int64(ABSENT)
# LLVM >= 15 has opaque pointers; the intrinsic's mangled name changed with them.
_PREFETCH_NAME = "llvm.prefetch.p0" if llvm_binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to load ``arr[idx]`` into cache (read, high locality); no effect on
    results, so correctness never depends on it."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH_NAME)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _match_mask(typingctx, arr, idx, key):
    """Bit ``j`` set when ``arr[idx + j] == key``, for ``j < 8``: the eight int64 words of
    a bucket compared with one vector instruction (AVX-512; two or four narrower ones on
    other CPUs, as LLVM lowers it). Replaces five compare-and-select pairs."""
    sig = types.int64(arr, idx, key)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        i64 = ir.IntType(64)
        vty = ir.VectorType(i64, _WORDS)
        words = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=8)
        splat = builder.insert_element(ir.Constant(vty, ir.Undefined), args[2], ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(splat, ir.Constant(vty, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), _WORDS), [0] * _WORDS))
        bits = builder.bitcast(builder.icmp_signed("==", words, splat), ir.IntType(_WORDS))
        return builder.zext(bits, i64)

    return sig, codegen


@intrinsic
def _lowest_bit(typingctx, x):
    """Index of the lowest set bit of a non-zero int64 (one ``tzcnt``)."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]),
                                            "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return sig, codegen


@numba.njit(inline="always", cache=True)
def mix64(x, seed):
    """splitmix64 finaliser of ``x ^ seed`` as uint64 (x: int64, seed: uint64)."""
    z = np.uint64(x) ^ seed
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(inline="always", cache=True)
def reduce_range(h, n):
    """Map uint64 ``h`` to ``[0, n)`` (uint64 n < 2**32) by multiply-shift of its top bits."""
    return ((h >> _S32) * n) >> _S32


@numba.njit(inline="always", cache=True)
def _bucket(key, nb):
    # Fibonacci hashing then multiply-shift: any bucket count, no division.
    return np.int64(reduce_range(np.uint64(key) * _FIB, nb))


@numba.njit(nogil=True, cache=True)
def hash_rows_into(ids, seed, base, n, out):
    """``out[i] = base + reduce_range(mix64(ids[i], seed), n)`` for every i."""
    s = np.uint64(seed)
    nn = np.uint64(n)
    b = np.int64(base)
    for i in range(ids.shape[0]):
        out[i] = b + np.int64(reduce_range(mix64(ids[i], s), nn))


def hash_rows(ids: np.ndarray, seed: int, base: int, n: int) -> np.ndarray:
    """Rows ``base + H_seed(id) mod n`` for an int64 id array (a new int64 array)."""
    if not 1 <= n < 2**32:
        raise MappingError(f"hash range must be in [1, 2**32), got {n}")
    out = np.empty(ids.shape[0], dtype=np.int64)
    hash_rows_into(np.ascontiguousarray(ids, dtype=np.int64), np.uint64(seed), base, n, out)
    return out


# ---------------------------------------------------------------------------- the table

@dataclasses.dataclass(frozen=True, eq=False)
class IdTable:
    """An immutable id -> row table (layout in the module docstring). ``words``: int64
    ``[8 * buckets]``, 64-byte aligned; ``rows32``: the same memory as uint32;
    ``sentinel_row``: row of the key ``EMPTY_KEY`` or -1 when absent; ``entries``: keys
    stored (the sentinel key included)."""

    words: np.ndarray
    rows32: np.ndarray
    sentinel_row: int
    entries: int

    @property
    def buckets(self) -> int:
        return self.words.shape[0] // _WORDS

    @property
    def capacity(self) -> int:
        return self.buckets * BUCKET_KEYS

    @property
    def nbytes(self) -> int:
        return int(self.words.nbytes)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys int64, rows int64) of every stored key, in slot order."""
        grid = self.words.reshape(-1, _WORDS)[:, :BUCKET_KEYS].ravel()
        rows = self.rows32.reshape(-1, 2 * _WORDS)[:, _ROW0:_MISS].ravel()
        used = grid != EMPTY_KEY
        keys, vals = grid[used], rows[used].astype(np.int64)
        if self.sentinel_row >= 0:
            keys = np.append(keys, EMPTY_KEY)
            vals = np.append(vals, np.int64(self.sentinel_row))
        return keys, vals


def table_buckets(entries: int, max_load: float = MAX_LOAD) -> int:
    """Buckets of a table holding ``entries`` keys (at least one, so at least one free slot)."""
    return max(1, math.ceil((entries + 1) / (BUCKET_KEYS * max_load)))


def table_nbytes(entries: int, max_load: float = MAX_LOAD) -> int:
    """Bytes of the table ``build_table`` makes for ``entries`` keys."""
    return table_buckets(entries, max_load) * BUCKET_BYTES


def table_entries_within(nbytes: int, max_load: float = MAX_LOAD) -> int:
    """The most keys whose table fits in ``nbytes`` (-1 when not even an empty one does)."""
    buckets = nbytes // BUCKET_BYTES
    return -1 if buckets < 1 else max(0, math.floor(buckets * BUCKET_KEYS * max_load) - 1)


def _aligned_words(buckets: int) -> np.ndarray:
    # one bucket per cache line: numpy guarantees 16-byte alignment only
    raw = np.empty(buckets * _WORDS + _WORDS, dtype=np.int64)
    skip = (-raw.ctypes.data % BUCKET_BYTES) // 8
    return raw[skip:skip + buckets * _WORDS]


@numba.njit(nogil=True, cache=True)
def _build(keys, rows, words, rows32):
    """Insert keys in order (distinct; EMPTY_KEY handled by the caller). Returns the index
    of the first duplicate key found, or -1."""
    nb = words.shape[0] // _WORDS
    nbu = np.uint64(nb)
    for i in range(keys.shape[0]):
        k = keys[i]
        if k == EMPTY_KEY:
            continue
        home = _bucket(k, nbu)
        b = home
        placed = False
        while not placed:
            base = b * _WORDS
            for j in range(BUCKET_KEYS):
                kk = words[base + j]
                if kk == k:
                    return i
                if kk == EMPTY_KEY:
                    words[base + j] = k
                    rows32[b * 2 * _WORDS + _ROW0 + j] = np.uint32(rows[i])
                    placed = True
                    break
            if not placed:
                # the home bucket is full: lookups of ids homed there must probe on
                rows32[home * 2 * _WORDS + _MISS] = np.uint32(NO_ROW)
                b += 1
                if b == nb:
                    b = 0
    return -1


def build_table(keys: np.ndarray, rows: np.ndarray, max_load: float = MAX_LOAD) -> IdTable:
    """Build a table from distinct int64 ``keys`` and their rows (integers in ``[0,
    ABSENT)``). Keys inserted first sit in their home bucket, so pass the most accessed
    first. Deterministic: the same keys in the same order give the same words.

    Raises ``MappingError`` naming the first duplicate key or an out-of-range row.
    """
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    rows = np.asarray(rows)
    if keys.shape != rows.shape or keys.ndim != 1:
        raise MappingError(f"keys and rows must be equal-length 1-d arrays, got {keys.shape} and {rows.shape}")
    if not 0.0 < max_load < 1.0:
        raise MappingError(f"table max_load must be in (0, 1), got {max_load}")
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= ABSENT):
        raise MappingError(f"table rows must be in [0, {ABSENT}), got [{int(rows.min())}, {int(rows.max())}]")
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    sentinel = np.flatnonzero(keys == EMPTY_KEY)
    if sentinel.shape[0] > 1:
        raise MappingError(f"duplicate id {int(EMPTY_KEY)} in mapping keys")
    buckets = table_buckets(keys.shape[0], max_load)
    if buckets >= 2**32:
        raise MappingError(f"{keys.shape[0]} ids need {buckets} buckets; a table holds < 2**32")
    words = _aligned_words(buckets)
    words[:] = EMPTY_KEY
    rows32 = words.view(np.uint32)
    rows32.reshape(-1, 2 * _WORDS)[:, _ROW0:_MISS] = NO_ROW
    rows32.reshape(-1, 2 * _WORDS)[:, _MISS] = ABSENT
    dup = _build(keys, rows, words, rows32)
    if dup >= 0:
        raise MappingError(f"duplicate id {int(keys[dup])} in mapping keys (each id must map to one row)")
    sentinel_row = int(rows[sentinel[0]]) if sentinel.shape[0] else -1
    return IdTable(words, rows32, sentinel_row, int(keys.shape[0]))


def table_from_words(words: np.ndarray, sentinel_row: int) -> IdTable:
    """The table whose ``words`` a stored mapper holds (``IdTable.words`` as written),
    copied to aligned memory. ``MappingError`` unless it is a well-formed table: whole
    buckets, free slots after used ones with ``NO_ROW`` rows, rows below ``ABSENT``, miss
    words ``ABSENT`` or ``NO_ROW``, a free slot somewhere, and every key found by a lookup
    with its stored row (so keys are distinct and spill flags and probe chains intact)."""
    words = np.asarray(words)
    if words.dtype != np.int64 or words.ndim != 1 or not words.size or words.size % _WORDS:
        raise MappingError(f"a table is a non-empty int64 array of whole {BUCKET_BYTES}-byte buckets, "
                           f"got {words.dtype} {words.shape}")
    if not -1 <= sentinel_row < ABSENT:
        raise MappingError(f"table sentinel row {sentinel_row} out of range")
    out = _aligned_words(words.size // _WORDS)
    out[:] = words
    rows32 = out.view(np.uint32)
    keys = out.reshape(-1, _WORDS)[:, :BUCKET_KEYS]
    rows = rows32.reshape(-1, 2 * _WORDS)[:, _ROW0:]
    free = keys == EMPTY_KEY
    if (free[:, :-1] & ~free[:, 1:]).any() or (rows[:, :BUCKET_KEYS][free] != NO_ROW).any() \
            or (rows[:, :BUCKET_KEYS][~free] >= ABSENT).any() or (rows[:, BUCKET_KEYS] < ABSENT).any():
        raise MappingError("stored id table is malformed (slot order or row words)")
    if not free[:, -1].any():
        raise MappingError("stored id table has no free slot")
    table = IdTable(out, rows32, int(sentinel_row), int((~free).sum()) + (sentinel_row >= 0))
    stored_keys, stored_rows = table.items()
    found = table_lookup(table, stored_keys, 0, 0, 1)
    if not np.array_equal(found, stored_rows):
        bad = int(np.argmax(found != stored_rows))
        raise MappingError(f"stored id table is malformed: id {int(stored_keys[bad])} is not found where stored")
    return table


@numba.njit(inline="always", cache=True)
def _probe(k, b, words, rows32):
    """The row of ``k`` probing buckets from ``b`` on, or -1 when absent."""
    nb = words.shape[0] // _WORDS
    while True:
        base = b * _WORDS
        for j in range(BUCKET_KEYS):
            if words[base + j] == k:
                return np.int64(rows32[b * 2 * _WORDS + _ROW0 + j])
        if words[base + BUCKET_KEYS - 1] == EMPTY_KEY:
            return -1
        b += 1
        if b == nb:
            b = 0


@numba.njit(nogil=True, cache=True)
def table_lookup_into(ids, words, rows32, sentinel_row, fb_seed, fb_base, fb_rows,
                      codes, code_seed, code_base, out):
    """``out[i]`` = the table's row of ``ids[i]``; for an id not in the table, its bucket
    code's row when ``codes`` gives one, else ``fb_base + H_fb_seed(id) mod fb_rows``
    (the fallback range). See the module docstring for the lookup's steps."""
    nb = words.shape[0] // _WORDS
    nbu = np.uint64(nb)
    seed = np.uint64(fb_seed)
    nfb = np.uint64(fb_rows)
    cseed = np.uint64(code_seed)
    ncodes = np.uint64(codes.shape[0])
    n = ids.shape[0]
    # small tables skip the prefetch through ``ahead`` rather than a second loop: a jitted
    # helper holding the loop body would pay two atomic reference counts per array per id
    ahead = PREFETCH_DISTANCE if words.shape[0] * 8 > PREFETCH_MIN_BYTES else n  # n: never
    for i in range(ahead if ahead < n else 0):
        _prefetch(words, _bucket(ids[i], nbu) * _WORDS)
    for i in range(n):
        if i + ahead < n:
            _prefetch(words, _bucket(ids[i + ahead], nbu) * _WORDS)
        k = ids[i]
        b = _bucket(k, nbu)
        # no branch on which slot matches (unpredictable): the lowest matching key slot, or
        # the miss word when none of the five does (words 5..7 hold rows: bit 5 is forced)
        slot = _ROW0 + _lowest_bit(_match_mask(words, b * _WORDS, k) | (1 << BUCKET_KEYS))
        r = np.int64(rows32[b * 2 * _WORDS + slot])
        if r >= _ABSENT:
            # rare: absent ids, spilled keys, the marker id (written out here: a helper
            # taking ``codes`` would pay two atomic reference counts per call)
            if r == _NO_ROW and k != EMPTY_KEY:
                r = _probe(k, b + 1 if b + 1 < nb else 0, words, rows32)
            else:
                r = -1
            if r < 0 and k == EMPTY_KEY:
                r = sentinel_row
            if r < 0 and ncodes > 0:
                c = np.int64(codes[np.int64(reduce_range(mix64(k, cseed), ncodes))])
                r = code_base + c - 1 if c > 0 else -1
            if r < 0:
                r = fb_base + np.int64(reduce_range(mix64(k, seed), nfb))
        out[i] = r


def table_lookup(table: IdTable, ids: np.ndarray, fb_seed: int, fb_base: int, fb_rows: int,
                 codes: np.ndarray = NO_CODES, code_seed: int = 0, code_base: int = 0) -> np.ndarray:
    """Rows of ``ids`` through ``table``, then ``codes``; the rest hashed into ``[fb_base,
    fb_base + fb_rows)``."""
    if not 1 <= fb_rows < 2**32:
        raise MappingError(f"fallback range must be in [1, 2**32), got {fb_rows}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty(ids.shape[0], dtype=np.int64)
    table_lookup_into(ids, table.words, table.rows32, table.sentinel_row, np.uint64(fb_seed), fb_base, fb_rows,
                      codes, np.uint64(code_seed), code_base, out)
    return out
