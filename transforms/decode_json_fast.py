"""A Numba parser for the common shape of JSON events: one flat object per record.

It parses each record in place (no joined buffer, no Python per record) and yields typed
columns for the fields of a ``DecodePlan``. It accepts a record only when it is *sure*
the record is a valid JSON object whose declared fields have the right JSON types and
that orjson/pyarrow would read to the very same values; anything else is marked *slow*
and left to the exact path in ``decode_json`` (which also classifies bad records). So it
is an accelerator with no semantics of its own. Marked slow:

* not an object, trailing bytes, a duplicate declared key, any syntax error;
* a key with a backslash; a declared string with a backslash; a ``\\u`` escape anywhere;
  a control byte inside a string;
* a nested object/array as a value (declared or not); multi-valued features (the plan
  must have none: ``supports`` says so);
* a declared field with a JSON type other than its own (or ``true``/``false``);
* an integer field with more than 18 digits or a fraction/exponent;
* a number that Clinger's fast path cannot convert exactly (more than 15 significant
  digits or a decimal exponent beyond +-22): with a mantissa below 2**53 and an exact
  power of ten, one IEEE multiply/divide is correctly rounded, as orjson and Arrow are.

UTF-8 is checked by the caller (only records with a byte >= 0x80).
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa

from transforms.decode import DecodePlan
from transforms.hashing import hash_bytes_value

__all__ = ["FastJsonLayout", "supports", "parse_fast", "high_byte_rows"]

KIND_NUMBER = 0  # float64
KIND_INT = 1  # int64
KIND_STRING = 2

_POW10 = np.array([10.0 ** k for k in range(23)], dtype=np.float64)


def supports(plan: DecodePlan) -> bool:
    """Whether the fast parser applies: no multi-valued feature, and no field name with a
    quote, backslash or control character (names are compared as raw key bytes)."""
    return not any(f.multi or any(ch in f.name for ch in '"\\') or any(ord(ch) < 32 for ch in f.name)
                   for f in plan.fields)


class FastJsonLayout:
    """Field names and kinds laid out for the kernel (built once per plan)."""

    def __init__(self, plan: DecodePlan):
        names = [f.name.encode() for f in plan.fields]
        self.fields = plan.fields
        self.name_data = np.frombuffer(b"".join(names) or b"\0", dtype=np.uint8).copy()
        self.name_off = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum([len(n) for n in names], out=self.name_off[1:])
        kinds, slots, counts = [], [], [0, 0, 0]
        for f in plan.fields:
            k = KIND_NUMBER if f.arrow_type == pa.float64() else KIND_STRING if f.arrow_type == pa.string() else KIND_INT
            kinds.append(k)
            slots.append(counts[k])
            counts[k] += 1
        self.materialize = frozenset(plan.filter_fields)
        self.kind = np.array(kinds, dtype=np.int64)
        self.slot = np.array(slots, dtype=np.int64)
        self.counts = counts
        size = 1
        while size < 4 * max(len(names), 1):
            size *= 2
        self.table = np.full(size, -1, dtype=np.int64)
        for i, n in enumerate(names):
            s = (hash_bytes_value(n) & ((1 << 64) - 1)) & (size - 1)
            while self.table[s] != -1:
                s = (s + 1) & (size - 1)
            self.table[s] = i


@numba.njit(cache=True, nogil=True)
def _ws(data, p, e):
    while p < e:
        b = data[p]
        if b > 32:
            break
        if b == 32 or b == 9 or b == 10 or b == 13:
            p += 1
        else:
            break
    return p


@numba.njit(cache=True, nogil=True)
def _key_hash(data, s, e):
    # must equal transforms.hashing (FNV-1a + splitmix64 finaliser)
    h = np.uint64(0xCBF29CE484222325)
    for k in range(s, e):
        h = (h ^ np.uint64(data[k])) * np.uint64(0x100000001B3)
    z = h
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _scan_string(data, p, e, allow_escapes):
    """p at the byte after the opening quote; returns the index of the closing quote, or
    -1 when the record must take the slow path."""
    while p < e:
        b = data[p]
        if b > 34 and b != 92:
            p += 1
            continue
        if b == 34:
            return p
        if b < 32:
            return -1
        if b == 92:
            if not allow_escapes or p + 1 >= e:
                return -1
            c = data[p + 1]
            if c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110 or c == 114 or c == 116:
                p += 2
                continue
            return -1
        p += 1
    return -1


@numba.njit(cache=True, nogil=True)
def _literal(data, p, e, w0, w1, w2, w3, w4, n):
    if p + n > e:
        return False
    if data[p] != w0 or data[p + 1] != w1 or data[p + 2] != w2 or data[p + 3] != w3:
        return False
    if n == 5 and data[p + 4] != w4:
        return False
    return True


@numba.njit(cache=True, nogil=True)
def _parse(data, starts, ends, name_data, name_off, kind, slot, table, pow10, n_num, n_int, n_str):
    n = starts.shape[0]
    nf = kind.shape[0]
    mask = np.uint64(table.shape[0] - 1)
    slow = np.zeros(n, dtype=np.uint8)
    fval = np.zeros((n_num, n), dtype=np.float64)
    fpres = np.zeros((n_num, n), dtype=np.uint8)
    ival = np.zeros((n_int, n), dtype=np.int64)
    ipres = np.zeros((n_int, n), dtype=np.uint8)
    sst = np.zeros((n_str, n), dtype=np.int64)
    sen = np.full((n_str, n), -1, dtype=np.int64)
    sid = np.zeros((n_str, n), dtype=np.int64)
    seen = np.full(max(nf, 1), -1, dtype=np.int64)
    # producers write keys in a stable order: guess the field after the previous one
    # and compare its name before falling back to the hash table
    nxt = np.full(nf + 1, -1, dtype=np.int64)
    for r in range(n):
        prev = nf
        p = _ws(data, starts[r], ends[r])
        e = ends[r]
        ok = True
        if p >= e or data[p] != 123:
            slow[r] = 1
            continue
        p = p + 1
        if p < e and data[p] <= 32:
            p = _ws(data, p, e)
        if p < e and data[p] == 125:
            p += 1
        else:
            while True:
                # key
                if p >= e or data[p] != 34:
                    ok = False
                    break
                ks = p + 1
                # the predicted field's name, then its closing quote, match in one pass
                # (names hold no quote, backslash or control byte: see supports())
                fi = -1
                ke = -1
                g = nxt[prev]
                if g >= 0:
                    a, b = name_off[g], name_off[g + 1]
                    if ks + (b - a) < e and data[ks + (b - a)] == 34:
                        same = True
                        for k in range(b - a):
                            if name_data[a + k] != data[ks + k]:
                                same = False
                                break
                        if same:
                            fi = g
                            ke = ks + (b - a)
                if fi < 0:
                    ke = _scan_string(data, ks, e, False)
                    if ke < 0:
                        ok = False
                        break
                p = ke + 1
                if p < e and data[p] <= 32:
                    p = _ws(data, p, e)
                if p >= e or data[p] != 58:
                    ok = False
                    break
                p = p + 1
                if p < e and data[p] <= 32:
                    p = _ws(data, p, e)
                if p >= e:
                    ok = False
                    break
                # field lookup when the guess missed
                s = _key_hash(data, ks, ke) & mask if fi < 0 else np.uint64(0)
                while fi < 0 and table[s] != -1:
                    cand = table[s]
                    a, b = name_off[cand], name_off[cand + 1]
                    if b - a == ke - ks:
                        same = True
                        for k in range(b - a):
                            if name_data[a + k] != data[ks + k]:
                                same = False
                                break
                        if same:
                            fi = cand
                            break
                    s = (s + np.uint64(1)) & mask
                c = data[p]
                if fi >= 0:
                    if seen[fi] == r:
                        ok = False
                        break
                    seen[fi] = r
                    nxt[prev] = fi
                    prev = fi
                    kd = kind[fi]
                    sl = slot[fi]
                    if c == 110:  # null
                        if not _literal(data, p, e, 110, 117, 108, 108, 0, 4):
                            ok = False
                            break
                        p += 4
                    elif kd == KIND_STRING:
                        if c != 34:
                            ok = False
                            break
                        # scan and hash (transforms.hashing) in one pass
                        q = p + 1
                        h = np.uint64(0xCBF29CE484222325)
                        while q < e:
                            ch = data[q]
                            if (ch > 34 and ch != 92) or ch == 32 or ch == 33:
                                h = (h ^ np.uint64(ch)) * np.uint64(0x100000001B3)
                                q += 1
                                continue
                            break
                        if q >= e or data[q] != 34:
                            ok = False
                            break
                        z = h
                        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                        sid[sl, r] = np.int64(z ^ (z >> np.uint64(31)))
                        sst[sl, r] = p + 1
                        sen[sl, r] = q
                        p = q + 1
                    else:
                        # JSON number, strict grammar
                        neg = False
                        if c == 45:
                            neg = True
                            p += 1
                        if p >= e:
                            ok = False
                            break
                        mant = np.int64(0)
                        nd = 0
                        d = data[p]
                        if d == 48:
                            p += 1
                        elif 49 <= d <= 57:
                            while p < e and 48 <= data[p] <= 57:
                                if nd < 18:
                                    mant = mant * 10 + (data[p] - 48)
                                nd += 1
                                p += 1
                        else:
                            ok = False
                            break
                        exp10 = 0
                        frac = False
                        if p < e and data[p] == 46:
                            frac = True
                            p += 1
                            if p >= e or not (48 <= data[p] <= 57):
                                ok = False
                                break
                            while p < e and 48 <= data[p] <= 57:
                                if nd > 0 or data[p] != 48:
                                    if nd < 18:
                                        mant = mant * 10 + (data[p] - 48)
                                    nd += 1
                                exp10 -= 1
                                p += 1
                        if p < e and (data[p] == 101 or data[p] == 69):
                            frac = True
                            p += 1
                            esign = 1
                            if p < e and (data[p] == 43 or data[p] == 45):
                                if data[p] == 45:
                                    esign = -1
                                p += 1
                            if p >= e or not (48 <= data[p] <= 57):
                                ok = False
                                break
                            ev = 0
                            while p < e and 48 <= data[p] <= 57:
                                if ev < 100000:
                                    ev = ev * 10 + (data[p] - 48)
                                p += 1
                            exp10 += esign * ev
                        if kd == KIND_INT:
                            if frac or nd > 18:
                                ok = False
                                break
                            ival[sl, r] = -mant if neg else mant
                            ipres[sl, r] = 1
                        else:
                            if nd > 15 or exp10 > 22 or exp10 < -22:
                                if mant == 0 and nd == 0:
                                    exp10 = 0  # 0, 0.000, 0e99: zero whatever the exponent
                                else:
                                    ok = False
                                    break
                            v = np.float64(mant)
                            if exp10 >= 0:
                                v = v * pow10[exp10]
                            else:
                                v = v / pow10[-exp10]
                            fval[sl, r] = -v if neg else v
                            fpres[sl, r] = 1
                else:
                    # an undeclared field: skip a scalar, validating it
                    if c == 34:
                        q = _scan_string(data, p + 1, e, True)
                        if q < 0:
                            ok = False
                            break
                        p = q + 1
                    elif c == 116:
                        if not _literal(data, p, e, 116, 114, 117, 101, 0, 4):
                            ok = False
                            break
                        p += 4
                    elif c == 102:
                        if not _literal(data, p, e, 102, 97, 108, 115, 101, 5):
                            ok = False
                            break
                        p += 5
                    elif c == 110:
                        if not _literal(data, p, e, 110, 117, 108, 108, 0, 4):
                            ok = False
                            break
                        p += 4
                    elif c == 45 or 48 <= c <= 57:
                        if c == 45:
                            p += 1
                        if p >= e:
                            ok = False
                            break
                        nd = 0
                        if data[p] == 48:
                            p += 1
                        elif 49 <= data[p] <= 57:
                            while p < e and 48 <= data[p] <= 57:
                                p += 1
                                nd += 1
                        else:
                            ok = False
                            break
                        if p < e and data[p] == 46:
                            p += 1
                            if p >= e or not (48 <= data[p] <= 57):
                                ok = False
                                break
                            while p < e and 48 <= data[p] <= 57:
                                p += 1
                        if p < e and (data[p] == 101 or data[p] == 69):
                            p += 1
                            if p < e and (data[p] == 43 or data[p] == 45):
                                p += 1
                            if p >= e or not (48 <= data[p] <= 57):
                                ok = False
                                break
                            ev = 0
                            while p < e and 48 <= data[p] <= 57:
                                if ev < 100000:
                                    ev = ev * 10 + (data[p] - 48)
                                p += 1
                            nd += ev
                        # orjson rejects a number that overflows double, even in a field
                        # nobody reads: leave anything near that to the exact path
                        if nd > 300:
                            ok = False
                            break
                    else:
                        ok = False
                        break
                if p < e and data[p] <= 32:
                    p = _ws(data, p, e)
                if p < e and data[p] == 44:
                    p = p + 1
                    if p < e and data[p] <= 32:
                        p = _ws(data, p, e)
                    continue
                if p < e and data[p] == 125:
                    p += 1
                    break
                ok = False
                break
        if ok:
            if p < e and data[p] <= 32:
                p = _ws(data, p, e)
            if p != e:
                ok = False
        if not ok:
            slow[r] = 1
    return slow, fval, fpres, ival, ipres, sst, sen, sid


@numba.njit(cache=True, nogil=True)
def _gather_strings(data, sst, sen, rows):
    n = rows.shape[0]
    offsets = np.zeros(n + 1, dtype=np.int32)
    total = 0
    for j in range(n):
        r = rows[j]
        if sen[r] >= 0:
            total += sen[r] - sst[r]
        offsets[j + 1] = total
    out = np.empty(max(total, 1), dtype=np.uint8)
    p = 0
    for j in range(n):
        r = rows[j]
        if sen[r] >= 0:
            for k in range(sst[r], sen[r]):
                out[p] = data[k]
                p += 1
    return offsets, out


@numba.njit(cache=True, nogil=True)
def high_byte_rows(data, starts, ends):
    """Per row: True when some byte is >= 0x80 (UTF-8 must then be checked)."""
    n = starts.shape[0]
    out = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        acc = np.uint8(0)
        for k in range(starts[i], ends[i]):
            acc |= data[k]
        out[i] = acc >= 128
    return out


def _bitmap(present: np.ndarray) -> pa.Buffer | None:
    if present.all():
        return None
    return pa.py_buffer(np.packbits(present.astype(np.uint8), bitorder="little"))


def parse_fast(layout: FastJsonLayout, data: np.ndarray, starts: np.ndarray,
               ends: np.ndarray) -> tuple[np.ndarray, dict[str, pa.Array], dict[str, np.ndarray]]:
    """Parse rows ``data[starts[i]:ends[i]]``; returns (bool mask of the rows parsed
    here, their columns, their string ids). String fields come as ids
    (``hashing.hash_strings`` of the value, computed while scanning) and, only when
    ``layout.materialize`` names them (the filter reads them), as string columns too."""
    n_num, n_int, n_str = layout.counts
    slow, fval, fpres, ival, ipres, sst, sen, sid = _parse(
        data, starts, ends, layout.name_data, layout.name_off, layout.kind, layout.slot, layout.table,
        _POW10, n_num, n_int, n_str)
    fast = slow == 0
    everything = bool(fast.all())
    rows = np.flatnonzero(fast)
    m = len(rows)
    cols: dict[str, pa.Array] = {}
    ids: dict[str, np.ndarray] = {}
    for f, k, sl in zip(layout.fields, layout.kind, layout.slot):
        if k == KIND_STRING:
            ids[f.name] = sid[sl] if everything else sid[sl][rows]
            if f.name in layout.materialize:
                offs, buf = _gather_strings(data, sst[sl], sen[sl], rows)
                present = sen[sl][rows] >= 0
                cols[f.name] = pa.Array.from_buffers(
                    pa.string(), m, [_bitmap(present), pa.py_buffer(offs), pa.py_buffer(buf)])
        else:
            vals, pres = (fval, fpres) if k == KIND_NUMBER else (ival, ipres)
            v = vals[sl] if everything else vals[sl][rows]
            present = (pres[sl] if everything else pres[sl][rows]).astype(bool)
            cols[f.name] = pa.Array.from_buffers(f.arrow_type, m, [_bitmap(present), pa.py_buffer(np.ascontiguousarray(v))])
    return fast, cols, ids
