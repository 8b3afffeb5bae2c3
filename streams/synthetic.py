"""Synthetic Criteo-shaped event streams with planted, learnable structure.

Each sparse feature draws ids from a Zipf distribution over ``cardinality`` ids. Ids are
assigned to ``groups_per_feature`` groups at random; ids of one group share a latent click
propensity, so a model (or a learned hash that puts similar ids in one row) can learn it.
The first ``informative_sparse`` sparse features and ``informative_dense`` dense features
carry signal; the rest are noise. Event ``i`` is a pure function of ``(seed, i)``: any
chunking of ``start``/``n`` gives the same events.

Example:
    >>> spec = SyntheticSpec(num_dense=2, num_sparse=3, cardinality=100)
    >>> ev = next(generate_events(spec, 1))
    >>> sorted(ev)[:3]
    ['c1', 'c2', 'c3']
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import numpy as np
import orjson

__all__ = [
    "SyntheticSpec", "SyntheticArrays", "generate_arrays", "generate_events",
    "generate_payloads", "synthetic_config_dict", "write_jsonl", "BAD_PAYLOADS",
]

_BLOCK = 4096

#: Malformed payloads mixed in by ``generate_payloads(bad_fraction>0)``, one of each kind
#: of bad input the pipeline must dead-letter (reason codes in transforms.elements.Reason).
BAD_PAYLOADS: tuple[bytes, ...] = (
    b"",  # empty_message
    b'{"label": 1, "i1": 3',  # malformed_json
    b"\xff\xfe{\"label\": 0}",  # not_utf8
    b"[1, 2, 3]",  # not_an_object
    b'{"i1": 5, "c1": "00ab"}',  # missing_label
    b'{"label": "yes", "c1": "00ab"}',  # bad_label
    b'{"label": 0, "i1": "many"}',  # wrong_type
    b'{"label": 1, "i1": 1e999}',  # non_finite
)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    num_dense: int = 13
    num_sparse: int = 26
    cardinality: int = 20_000  # distinct ids per sparse feature
    zipf_exponent: float = 1.1
    groups_per_feature: int = 64
    informative_sparse: int = 6
    informative_dense: int = 3
    base_ctr: float = 0.25
    signal_scale: float = 1.2  # std of a group's latent logit contribution
    missing_dense_rate: float = 0.05
    seed: int = 0
    start_time_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    event_interval_ms: int = 10

    def __post_init__(self):
        if self.num_dense < 0 or self.num_sparse < 0 or self.num_dense + self.num_sparse == 0:
            raise ValueError("need at least one dense or sparse feature")
        if self.cardinality < 1 or self.groups_per_feature < 1:
            raise ValueError("cardinality and groups_per_feature must be >= 1")


@dataclasses.dataclass(frozen=True)
class SyntheticArrays:
    dense: np.ndarray  # float32 [n, num_dense], raw counts, NaN = missing
    ids: np.ndarray  # int64 [n, num_sparse], raw category ids in [0, cardinality)
    groups: np.ndarray  # int64 [n, num_sparse], planted group of each id
    labels: np.ndarray  # float32 [n], 0/1
    event_time_ms: np.ndarray  # int64 [n]


@functools.lru_cache(maxsize=8)
def _tables(spec: SyntheticSpec):
    rng = np.random.default_rng([spec.seed, 0x5EED])
    ranks = np.arange(1, spec.cardinality + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -spec.zipf_exponent)
    cdf /= cdf[-1]
    # rank -> id permutation per feature, so frequency is not monotone in the id value
    perms = np.stack([rng.permutation(spec.cardinality) for _ in range(spec.num_sparse)]) \
        if spec.num_sparse else np.zeros((0, spec.cardinality), np.int64)
    groups = rng.integers(0, spec.groups_per_feature, size=(spec.num_sparse, spec.cardinality))
    weights = rng.normal(0.0, spec.signal_scale, size=(spec.num_sparse, spec.groups_per_feature))
    weights[spec.informative_sparse:] = 0.0
    dense_coef = np.zeros(spec.num_dense)
    dense_coef[: spec.informative_dense] = rng.normal(0.0, 0.8, size=min(spec.informative_dense, spec.num_dense))
    bias = float(np.log(spec.base_ctr / (1.0 - spec.base_ctr)))
    return cdf, perms, groups, weights, dense_coef, bias


def _block(spec: SyntheticSpec, b: int) -> SyntheticArrays:
    cdf, perms, groups, weights, dense_coef, bias = _tables(spec)
    rng = np.random.default_rng([spec.seed, b])
    n = _BLOCK
    ranks = np.searchsorted(cdf, rng.random((n, spec.num_sparse)))
    ranks = np.minimum(ranks, spec.cardinality - 1)
    f = np.arange(spec.num_sparse)[None, :]
    ids = perms[f, ranks].astype(np.int64) if spec.num_sparse else np.zeros((n, 0), np.int64)
    grp = groups[f, ids].astype(np.int64) if spec.num_sparse else np.zeros((n, 0), np.int64)
    logit = bias + weights[f, grp].sum(axis=1) if spec.num_sparse else np.full(n, bias)
    z = rng.normal(0.0, 1.0, size=(n, spec.num_dense))
    dense = np.floor(np.exp(1.5 + 1.2 * z)).astype(np.float32)
    logit = logit + (z * dense_coef[None, :]).sum(axis=1) - 0.5 * (dense_coef ** 2).sum()
    dense[rng.random((n, spec.num_dense)) < spec.missing_dense_rate] = np.nan
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    idx = np.arange(b * n, (b + 1) * n, dtype=np.int64)
    return SyntheticArrays(dense, ids, grp, labels, spec.start_time_ms + idx * spec.event_interval_ms)


def generate_arrays(spec: SyntheticSpec, n: int, start: int = 0) -> SyntheticArrays:
    """Events ``[start, start + n)`` as arrays (no JSON), for benchmarks and tests."""
    if n < 0 or start < 0:
        raise ValueError("n and start must be >= 0")
    first, last = start // _BLOCK, (start + n + _BLOCK - 1) // _BLOCK
    blocks = [_block(spec, b) for b in range(first, max(last, first + 1))]
    lo = start - first * _BLOCK
    cat = lambda name: np.concatenate([getattr(x, name) for x in blocks])[lo: lo + n]  # noqa: E731
    return SyntheticArrays(cat("dense"), cat("ids"), cat("groups"), cat("labels"), cat("event_time_ms"))


def _salt(feature: int) -> int:
    return (0x9E3779B1 * (feature + 1)) & 0xFFFFFFFF


def generate_events(spec: SyntheticSpec, n: int, start: int = 0) -> Iterator[dict]:
    """Events ``[start, start + n)`` as JSON-ready dicts: ``label``, ``i1..``, ``c1..`` (hex
    strings, like Criteo's), ``ts`` (event time, ms). A missing dense value is omitted."""
    for offset in range(start, start + n, _BLOCK):
        a = generate_arrays(spec, min(_BLOCK, start + n - offset), offset)
        salts = [_salt(j) for j in range(spec.num_sparse)]
        for r in range(a.labels.shape[0]):
            ev: dict = {"label": int(a.labels[r])}
            for j in range(spec.num_dense):
                v = a.dense[r, j]
                if not np.isnan(v):
                    ev[f"i{j + 1}"] = int(v)
            for j in range(spec.num_sparse):
                ev[f"c{j + 1}"] = format(int(a.ids[r, j]) ^ salts[j], "08x")
            ev["ts"] = int(a.event_time_ms[r])
            yield ev


@functools.lru_cache(maxsize=4)
def _sparse_json(spec: SyntheticSpec) -> list[list[str]]:
    """Per sparse feature, the JSON member text of every id (built once per spec)."""
    return [[f',"c{j + 1}":"{(i ^ _salt(j)):08x}"' for i in range(spec.cardinality)] for j in range(spec.num_sparse)]


def _payload_block(spec: SyntheticSpec, n: int, start: int) -> list[bytes]:
    """``orjson.dumps`` of ``generate_events`` byte for byte, from precomputed member
    texts (several times faster than a dict and a dumps per event)."""
    a = generate_arrays(spec, n, start)
    sparse = _sparse_json(spec)
    labels = a.labels.astype(np.int64).tolist()
    dense = a.dense.tolist()
    ids = a.ids.tolist()
    ts = a.event_time_ms.tolist()
    dense_keys = [f',"i{j + 1}":' for j in range(spec.num_dense)]
    out = []
    for r in range(n):
        parts = [f'{{"label":{labels[r]}']
        parts += [k + str(int(v)) for k, v in zip(dense_keys, dense[r]) if v == v]  # v != v: NaN = missing
        parts += [col[i] for col, i in zip(sparse, ids[r])]
        parts.append(f',"ts":{ts[r]}}}')
        out.append("".join(parts).encode())
    return out


def generate_payloads(spec: SyntheticSpec, n: int, start: int = 0, bad_fraction: float = 0.0) -> list[bytes]:
    """Events as JSON bytes, identical to ``orjson.dumps`` of ``generate_events``; with
    ``bad_fraction > 0`` a deterministic share of them is replaced by the malformed
    payloads of ``BAD_PAYLOADS`` (cycled)."""
    out: list[bytes] = []
    for offset in range(start, start + n, _BLOCK):
        out.extend(_payload_block(spec, min(_BLOCK, start + n - offset), offset))
    if bad_fraction > 0:
        every = max(int(round(1.0 / bad_fraction)), 1)
        for k, i in enumerate(range(start + every - 1, start + n, every)):
            out[i - start] = BAD_PAYLOADS[k % len(BAD_PAYLOADS)]
    return out


def write_jsonl(spec: SyntheticSpec, n: int, path: str, start: int = 0) -> int:
    """Write events ``[start, start+n)`` as a .jsonl (or .jsonl.gz) file; returns n."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        for ev in generate_events(spec, n, start):
            fh.write(orjson.dumps(ev) + b"\n")
    return n


def synthetic_config_dict(spec: SyntheticSpec, *, rows: int | None = None, embedding_dim: int = 16) -> dict:
    """A config document (as parsed TOML) whose schema matches ``generate_events``."""
    rows = rows or spec.cardinality
    return {
        "schema": {
            "format": "json",
            "label": "label",
            "event_time": "ts",
            "dense": [{"name": f"i{j + 1}", "log1p": True} for j in range(spec.num_dense)],
            "sparse": [{"name": f"c{j + 1}", "rows": rows} for j in range(spec.num_sparse)],
        },
        "trainer": {"embedding_dim": embedding_dim, "bottom_mlp": [64, embedding_dim]},
    }
