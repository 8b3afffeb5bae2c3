"""Stable 64-bit ids of sparse values (Numba kernels over Arrow buffers).

The ids are stored in the cache and fed to fitted mappings, so the algorithm is part of
the data format: it is the same in every process, run and platform, and never changes.

* **Strings and bytes** (the UTF-8 bytes of a string; the raw bytes of a binary):
  64-bit FNV-1a over the bytes (offset basis ``0xcbf29ce484222325``, prime
  ``0x100000001b3``), then the splitmix64 finaliser (``z ^= z >> 30; z *= 0xbf58476d1ce4e5b9;
  z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31``), all modulo 2**64. FNV alone has
  weak low bits; the finaliser spreads every input bit over the whole word, so
  ``id % rows`` is uniform.
* **Integers** (int64, taken as their two's-complement uint64 ``u``): the splitmix64
  step ``finalise(u + 0x9e3779b97f4a7c15)`` (a bijection: distinct ints never collide).
* The uint64 result is returned as int64 (same bits).
* A **missing** value (null) gets ``MISSING_ID`` (= 0). A present value hashes to 0 with
  probability 2**-64.
* A **feature cross** of ids ``(a, b, ...)``: the string rule above over their int64
  little-endian bytes concatenated (8 bytes per id); ``MISSING_ID`` when any id is.

``hash_bytes_value`` and ``hash_int_value`` are the plain-Python definitions; the kernels
are checked against them.

Example:
    >>> import pyarrow as pa
    >>> hash_strings(pa.array(["a", None])).tolist() == [hash_bytes_value(b"a"), MISSING_ID]
    True
"""

from __future__ import annotations

from typing import Sequence

import numba
import numpy as np
import pyarrow as pa

__all__ = [
    "MISSING_ID", "hash_strings", "hash_ints", "hash_binary_buffers", "hash_bytes_value",
    "hash_int_value", "unit_interval", "hash_cross", "hash_cross_value",
]

#: Id of a missing (null) sparse value.
MISSING_ID = 0

_MASK64 = (1 << 64) - 1
_FNV_BASIS = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_GOLDEN = 0x9E3779B97F4A7C15
_F1 = 0xBF58476D1CE4E5B9
_F2 = 0x94D049BB133111EB

_U_BASIS = np.uint64(_FNV_BASIS)
_U_PRIME = np.uint64(_FNV_PRIME)
_U_GOLDEN = np.uint64(_GOLDEN)
_U_F1 = np.uint64(_F1)
_U_F2 = np.uint64(_F2)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


def _finalise_py(z: int) -> int:
    z = ((z ^ (z >> 30)) * _F1) & _MASK64
    z = ((z ^ (z >> 27)) * _F2) & _MASK64
    return z ^ (z >> 31)


def _to_int64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def hash_bytes_value(value: bytes | str) -> int:
    """Reference definition of the id of one string (UTF-8) or bytes value, as int64."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    h = _FNV_BASIS
    for b in value:
        h = ((h ^ b) * _FNV_PRIME) & _MASK64
    return _to_int64(_finalise_py(h))


def hash_int_value(value: int) -> int:
    """Reference definition of the id of one int64 value, as int64."""
    if not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"{value} is outside int64")
    return _to_int64(_finalise_py(((value & _MASK64) + _GOLDEN) & _MASK64))


@numba.njit(inline="always")
def _finalise(z):
    z = (z ^ (z >> _S30)) * _U_F1
    z = (z ^ (z >> _S27)) * _U_F2
    return z ^ (z >> _S31)


@numba.njit(cache=True, nogil=True)
def _hash_binary_kernel(offsets, data, validity, bit_offset, has_validity):
    n = offsets.shape[0] - 1
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        if has_validity:
            j = i + bit_offset
            if not (validity[j >> 3] >> (j & 7)) & 1:
                out[i] = 0
                continue
        h = _U_BASIS
        for k in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[k])) * _U_PRIME
        out[i] = np.int64(_finalise(h))
    return out


@numba.njit(cache=True, nogil=True)
def _hash_int_kernel(values, validity, bit_offset, has_validity):
    n = values.shape[0]
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        if has_validity:
            j = i + bit_offset
            if not (validity[j >> 3] >> (j & 7)) & 1:
                out[i] = 0
                continue
        out[i] = np.int64(_finalise(np.uint64(values[i]) + _U_GOLDEN))
    return out


_EMPTY_U8 = np.zeros(1, dtype=np.uint8)

_BINARY_OFFSETS = {
    pa.string(): np.int32, pa.binary(): np.int32,
    pa.large_string(): np.int64, pa.large_binary(): np.int64,
}


def _validity(arr: pa.Array) -> tuple[np.ndarray, bool]:
    buf = arr.buffers()[0]
    if buf is None or arr.null_count == 0:
        return _EMPTY_U8, False
    return np.frombuffer(buf, dtype=np.uint8), True


def hash_binary_buffers(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Ids of the byte strings ``data[offsets[i]:offsets[i+1]]`` (no nulls)."""
    return _hash_binary_kernel(offsets, data, _EMPTY_U8, 0, False)


def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Ids (int64) of a string/binary (or large_*) array; nulls -> ``MISSING_ID``.
    Reads the Arrow offsets and data buffers directly: no per-value Python."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    otype = _BINARY_OFFSETS.get(arr.type)
    if otype is None:
        raise TypeError(f"hash_strings needs a string or binary array, got {arr.type}")
    if len(arr) == 0:
        return np.empty(0, dtype=np.int64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=otype)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None and bufs[2].size else _EMPTY_U8
    validity, has_validity = _validity(arr)
    return _hash_binary_kernel(offsets, data, validity, arr.offset, has_validity)


def hash_ints(arr: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """Ids (int64) of an int64 array (Arrow, with nulls -> ``MISSING_ID``, or numpy)."""
    if isinstance(arr, np.ndarray):
        if arr.dtype != np.int64:
            raise TypeError(f"hash_ints needs int64 values, got {arr.dtype}")
        return _hash_int_kernel(arr, _EMPTY_U8, 0, False)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.int64():
        raise TypeError(f"hash_ints needs an int64 array, got {arr.type}")
    if len(arr) == 0:
        return np.empty(0, dtype=np.int64)
    values = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + len(arr)]
    validity, has_validity = _validity(arr)
    return _hash_int_kernel(values, validity, arr.offset, has_validity)


def hash_cross_value(ids: Sequence[int]) -> int:
    """Reference definition of the id of the cross of ``ids`` (int64 each), as int64."""
    if any(i == MISSING_ID for i in ids):
        return MISSING_ID
    return hash_bytes_value(b"".join(int(i).to_bytes(8, "little", signed=True) for i in ids))


def hash_cross(ids: Sequence[np.ndarray]) -> np.ndarray:
    """Ids (int64) of the row-wise crosses of two or more equal-length int64 id arrays."""
    stacked = np.ascontiguousarray(np.stack([np.asarray(a, dtype="<i8") for a in ids], axis=1))
    n, k = stacked.shape
    width = 8 * k
    out = hash_binary_buffers(np.arange(0, (n + 1) * width, width, dtype=np.int64),
                              stacked.view(np.uint8).reshape(-1) if n else _EMPTY_U8)
    out[(stacked == MISSING_ID).any(axis=1)] = MISSING_ID
    return out


def unit_interval(ids: np.ndarray) -> np.ndarray:
    """Map ids to float64 in [0, 1): the top 53 bits of the uint64 over 2**53."""
    return (ids.view(np.uint64) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
