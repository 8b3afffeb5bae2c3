"""Numba kernels shared by the id mappers: 64-bit mixers, range reduction and an
open-addressing id -> row table.

Everything here is a pure function of its arguments (no global state), compiled with
``nogil=True`` so callers may run it from several threads, and ``parallel=False`` because
the ingest path already runs one batch per worker.

Hashing contract (stored mappings depend on it; never change the constants):

* ``mix64(x, seed)`` is the splitmix64 finaliser of ``x ^ seed`` (a bijection on 64 bits).
* ``reduce_range(h, n)`` maps a 64-bit hash to ``[0, n)`` with Lemire's multiply-shift on
  the top 32 bits (``((h >> 32) * n) >> 32``): no division, uniform to within 2**-32 for
  ``n < 2**32``.
* ``hash_rows(ids, seed, base, n)`` = ``base + reduce_range(mix64(id, seed), n)``.

The table (``IdTable``) stores keys and values interleaved in one int64 array
``[k0, v0, k1, v1, ...]`` so a probe touches one cache line; capacity is a power of two at
least twice the entry count (load factor <= 0.5, so linear probing ends after ~1.5 probes
on a hit and ~2.5 on a miss); slots are addressed by Fibonacci multiply-shift of the key.
The lookup prefetches the first slot of the id ``PREFETCH_DISTANCE`` places ahead, so a
table larger than the caches is limited by memory parallelism, not latency.
``EMPTY_KEY`` (int64 min) marks a free slot; when that value is itself a key, its row is
kept aside in ``sentinel_row``.
"""

from __future__ import annotations

import dataclasses

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from transforms.errors import MappingError

__all__ = [
    "EMPTY_KEY", "mix64", "reduce_range", "hash_rows", "hash_rows_into", "IdTable",
    "build_table", "table_lookup", "table_lookup_into",
]

EMPTY_KEY = np.int64(np.iinfo(np.int64).min)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_FIB = np.uint64(0x9E3779B97F4A7C15)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_ONE = np.uint64(1)
#: Ids ahead whose first probe slot is prefetched: enough in-flight cache misses to hide
#: memory latency, few enough that the lines are still in L1 when used.
PREFETCH_DISTANCE = 32
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
def _slot(key, shift):
    # Fibonacci hashing: the top bits of key * 2**64/phi; good spread for sequential ids.
    return (np.uint64(key) * _FIB) >> shift


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


@dataclasses.dataclass(frozen=True)
class IdTable:
    """An immutable id -> row table. ``slots``: int64 ``[2 * capacity]``, interleaved
    key/value; ``shift`` = 64 - log2(capacity); ``sentinel_row``: row of the key
    ``EMPTY_KEY`` or -1 when absent; ``entries``: number of keys stored."""

    slots: np.ndarray
    shift: int
    sentinel_row: int
    entries: int

    @property
    def capacity(self) -> int:
        return self.slots.shape[0] // 2

    @property
    def nbytes(self) -> int:
        return int(self.slots.nbytes)


@numba.njit(nogil=True, cache=True)
def _build(keys, values, slots, shift):
    """Insert keys (distinct except EMPTY_KEY, handled by the caller). Returns the index of
    the first duplicate key found, or -1."""
    mask = np.uint64(slots.shape[0] // 2 - 1)
    for i in range(keys.shape[0]):
        k = keys[i]
        if k == EMPTY_KEY:
            continue
        s = _slot(k, shift)
        while True:
            j = np.int64(s) * 2
            kk = slots[j]
            if kk == EMPTY_KEY:
                slots[j] = k
                slots[j + 1] = values[i]
                break
            if kk == k:
                return i
            s = (s + _ONE) & mask
    return -1


def build_table(keys: np.ndarray, values: np.ndarray) -> IdTable:
    """Build a table from distinct int64 ``keys`` and their int64 ``values`` (rows >= 0).

    Raises ``MappingError`` naming the first duplicate key. Deterministic: the same keys in
    the same order give the same slot array.
    """
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    values = np.ascontiguousarray(values, dtype=np.int64)
    if keys.shape != values.shape or keys.ndim != 1:
        raise MappingError(f"keys and values must be equal-length 1-d arrays, got {keys.shape} and {values.shape}")
    n = keys.shape[0]
    bits = max(4, int(2 * max(n, 1) - 1).bit_length())  # capacity >= 2n, power of two
    slots = np.full(2 * (1 << bits), EMPTY_KEY, dtype=np.int64)
    sentinel = np.flatnonzero(keys == EMPTY_KEY)
    if sentinel.shape[0] > 1:
        raise MappingError(f"duplicate id {int(EMPTY_KEY)} in mapping keys")
    dup = _build(keys, values, slots, np.uint64(64 - bits))
    if dup >= 0:
        raise MappingError(f"duplicate id {int(keys[dup])} in mapping keys (each id must map to one row)")
    sentinel_row = int(values[sentinel[0]]) if sentinel.shape[0] else -1
    return IdTable(slots, 64 - bits, sentinel_row, n)


@numba.njit(nogil=True, cache=True)
def table_lookup_into(ids, slots, shift, sentinel_row, fb_seed, fb_base, fb_rows, out):
    """``out[i]`` = the table's row of ``ids[i]``, or ``fb_base + H_fb_seed(id) mod fb_rows``
    when the id is not in the table (the fallback range for unseen ids)."""
    mask = np.uint64(slots.shape[0] // 2 - 1)
    seed = np.uint64(fb_seed)
    nfb = np.uint64(fb_rows)
    n = ids.shape[0]
    # Software pipelining: the slot of id i + PREFETCH_DISTANCE is requested while id i is
    # resolved, so many independent cache misses are in flight instead of one (32 was the
    # best distance measured on a quiet Xeon core: 16 gave ~5% less, 64 the same).
    for i in range(min(PREFETCH_DISTANCE, n)):
        _prefetch(slots, np.int64(_slot(ids[i], shift)) * 2)
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            _prefetch(slots, np.int64(_slot(ids[i + PREFETCH_DISTANCE], shift)) * 2)
        k = ids[i]
        if k == EMPTY_KEY:
            if sentinel_row >= 0:
                out[i] = sentinel_row
            else:
                out[i] = fb_base + np.int64(reduce_range(mix64(k, seed), nfb))
            continue
        s = _slot(k, shift)
        while True:
            j = np.int64(s) * 2
            kk = slots[j]
            if kk == k:
                out[i] = slots[j + 1]
                break
            if kk == EMPTY_KEY:
                out[i] = fb_base + np.int64(reduce_range(mix64(k, seed), nfb))
                break
            s = (s + _ONE) & mask


def table_lookup(table: IdTable, ids: np.ndarray, fb_seed: int, fb_base: int, fb_rows: int) -> np.ndarray:
    """Rows of ``ids`` through ``table``, unseen ids hashed into ``[fb_base, fb_base + fb_rows)``."""
    if not 1 <= fb_rows < 2**32:
        raise MappingError(f"fallback range must be in [1, 2**32), got {fb_rows}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty(ids.shape[0], dtype=np.int64)
    table_lookup_into(ids, table.slots, np.uint64(table.shift), table.sentinel_row,
                      np.uint64(fb_seed), fb_base, fb_rows, out)
    return out
