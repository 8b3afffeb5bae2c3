"""Remap throughput: the learned mapper's id table (64-byte buckets, one cache line per
lookup) vs the hashing trick and a numpy sorted-search baseline, measured in the same run
on one core. ``learned`` is ``LearnedMapper.map`` (argument checks and the output array
included); ``kernel`` the bare Numba lookup into a preallocated array.

The table holds ``--entries`` ids (default one million); queries are batches of
``--batch`` ids drawn Zipf(``--zipf``) over the table's ids, as ingest traffic is, with a
share ``--unseen`` of ids the table does not hold (they take the fallback hash). A second
line repeats the measurement with ids drawn *uniformly* over the table (every lookup a
cache miss: the worst case). Each figure is the best of ``--repeats`` timed passes over
the whole query set, after a warm-up pass (JIT compiled, caches warm).

    python bench/remap.py [--entries 1000000] [--json]
    python bench/remap.py --fit-ids 10000000 --fit-rows 1000000   # also time a learned fit

With ``--json`` the last line is ``{"learned_ids_per_s", "kernel_ids_per_s",
"modulo_ids_per_s", "numpy_ids_per_s", "table_entries", "table_bytes", ...}`` (the Zipf
workload; ``uniform_*`` keys for the uniform one; ``fit_*`` keys when ``--fit-ids`` asked for
a fit timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from transforms.hash_fit import IdStats, fit_learned  # noqa: E402
from transforms.hash_kernels import table_lookup_into  # noqa: E402
from transforms.learned_hash import LearnedMapper  # noqa: E402
from transforms.mappers import ModuloMapper  # noqa: E402

__all__ = ["main", "numpy_remap"]


def numpy_remap(keys: np.ndarray, values: np.ndarray, ids: np.ndarray, fb_base: int, fb_rows: int) -> np.ndarray:
    """The same mapping with numpy only: binary search in the sorted keys, take, and a
    modulo for misses (what one writes without a kernel)."""
    pos = np.searchsorted(keys, ids)
    pos = np.minimum(pos, keys.size - 1)
    hit = keys.take(pos) == ids
    out = values.take(pos)
    miss = ~hit
    out[miss] = fb_base + ids[miss].view(np.uint64) % np.uint64(fb_rows)
    return out


def time_fit(n_ids: int, rows: int, seed: int) -> dict:
    """Seconds to fit a learned mapping of ``n_ids`` distinct ids (Zipf counts, labels
    with a per-id click rate) into ``rows`` rows, from statistics only. The first call
    compiles the kernels, so a tiny fit runs first."""
    rng = np.random.default_rng(seed)

    def stats(n: int) -> IdStats:
        ids = rng.permutation(np.arange(n, dtype=np.int64) * 7919 + 13)
        counts = np.floor(1e6 / np.arange(1, n + 1) ** 1.1) + 1
        sums = rng.binomial(counts.astype(np.int64), rng.uniform(0.05, 0.5, n)).astype(np.float64)
        return IdStats(ids, counts, sums)

    fit_learned(stats(1000), 100)
    st = stats(n_ids)
    t0 = time.perf_counter()
    m = fit_learned(st, rows)
    return {"fit_ids": n_ids, "fit_rows": rows, "fit_s": round(time.perf_counter() - t0, 3),
            "fit_table_bytes": m.nbytes}


def best_rate(fn, batches: list[np.ndarray], repeats: int) -> float:
    for b in batches:  # warm-up: compile, fault pages in
        fn(b)
    n = sum(b.size for b in batches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000, help="ids in the learned table")
    ap.add_argument("--rows", type=int, default=0, help="table rows (default entries // 4)")
    ap.add_argument("--queries", type=int, default=4_000_000, help="ids remapped per timed pass")
    ap.add_argument("--batch", type=int, default=65_536, help="ids per map() call")
    ap.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the query ids")
    ap.add_argument("--unseen", type=float, default=0.05, help="share of query ids not in the table")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-ids", type=int, default=0, help="also time fitting this many distinct ids (0 = skip)")
    ap.add_argument("--fit-rows", type=int, default=0, help="rows of that fit (default fit-ids // 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    if args.entries < 1 or args.queries < 1 or args.batch < 1 or not 0 <= args.unseen < 1:
        ap.error("entries, queries and batch must be >= 1 and unseen in [0, 1)")
    numba.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    rows = args.rows or max(2, args.entries // 4)
    keys = np.unique(rng.integers(-(1 << 63), (1 << 63) - 1, size=int(args.entries * 1.01) + 8, dtype=np.int64))
    keys = rng.permutation(keys)[: args.entries]
    # keys[r] is the id of popularity rank r (the Zipf workload draws ranks); a fitted
    # mapping lists its ids most accessed first, and so does this one
    reserve = max(1, rows // 50)
    values = rng.integers(0, rows - reserve, size=keys.size)
    print(f"building a {keys.size:,}-entry table ({rows:,} rows) ...", file=sys.stderr)
    learned = LearnedMapper(rows, keys=keys, values=values, hot=0, fallback_base=rows - reserve,
                            fallback_rows=reserve)
    modulo = ModuloMapper(rows)
    by_id = np.argsort(learned.keys)  # the numpy baseline binary-searches sorted ids
    skeys, svalues = learned.keys[by_id], learned.values[by_id]

    def workload(kind: str) -> list[np.ndarray]:
        if kind == "zipf":
            ranks = np.arange(1, keys.size + 1, dtype=np.float64)
            cdf = np.cumsum(ranks ** -args.zipf)
            cdf /= cdf[-1]
            picks = np.minimum(np.searchsorted(cdf, rng.random(args.queries)), keys.size - 1)
        else:
            picks = rng.integers(0, keys.size, size=args.queries)
        ids = keys[picks]
        unseen = rng.random(args.queries) < args.unseen
        ids[unseen] = rng.integers(-(1 << 63), (1 << 63) - 1, size=int(unseen.sum()), dtype=np.int64)
        return [ids[i:i + args.batch] for i in range(0, ids.size, args.batch)]

    out = np.empty(args.batch, dtype=np.int64)

    def kernel(b: np.ndarray) -> None:
        t = learned.table
        table_lookup_into(b, t.words, t.rows32, t.sentinel_row, np.uint64(learned.seed), learned.fallback_base,
                          learned.fallback_rows, learned.codes, np.uint64(learned.code_seed), learned.code_base,
                          out[:b.size])

    results = {}
    for kind in ("zipf", "uniform"):
        batches = workload(kind)
        check = batches[0]
        assert np.array_equal(learned.map(check)[~np.isin(check, skeys)] >= rows - reserve,
                              np.ones((~np.isin(check, skeys)).sum(), bool))
        hit = np.isin(check, skeys)
        assert np.array_equal(learned.map(check)[hit],
                              numpy_remap(skeys, svalues, check, rows - reserve, reserve)[hit])
        results[kind] = {
            "learned": best_rate(learned.map, batches, args.repeats),
            "kernel": best_rate(kernel, batches, args.repeats),
            "modulo": best_rate(modulo.map, batches, args.repeats),
            "numpy": best_rate(lambda b: numpy_remap(skeys, svalues, b, rows - reserve, reserve),
                               batches, args.repeats),
        }
    print(f"{'workload':<10}{'learned table':>18}{'bare kernel':>16}{'modulo (hash trick)':>22}"
          f"{'numpy search+take':>20}{'learned/modulo':>16}")
    for kind, r in results.items():
        print(f"{kind:<10}{r['learned'] / 1e6:>14.1f} M/s{r['kernel'] / 1e6:>12.1f} M/s"
              f"{r['modulo'] / 1e6:>18.1f} M/s{r['numpy'] / 1e6:>16.1f} M/s{r['learned'] / r['modulo']:>15.2f}x")
    print(f"table: {learned.entries:,} entries, {learned.table.capacity:,} slots, "
          f"{learned.nbytes / 2**20:.1f} MiB ({learned.nbytes / learned.entries:.1f} B/id); "
          f"batch {args.batch:,} ids; one core")
    fit = {}
    if args.fit_ids:
        fit = time_fit(args.fit_ids, args.fit_rows or max(2, args.fit_ids // 10), args.seed)
        print(f"learned fit: {fit['fit_ids']:,} ids into {fit['fit_rows']:,} rows in {fit['fit_s']:.1f} s")
    if args.json:
        z, u = results["zipf"], results["uniform"]
        print(json.dumps({**fit,
            "learned_ids_per_s": round(z["learned"]), "kernel_ids_per_s": round(z["kernel"]),
            "modulo_ids_per_s": round(z["modulo"]), "uniform_kernel_ids_per_s": round(u["kernel"]),
            "numpy_ids_per_s": round(z["numpy"]), "table_entries": learned.entries,
            "uniform_learned_ids_per_s": round(u["learned"]), "uniform_modulo_ids_per_s": round(u["modulo"]),
            "uniform_numpy_ids_per_s": round(u["numpy"]), "table_bytes": learned.nbytes,
            "workload": f"zipf({args.zipf}), {args.unseen:.0%} unseen, batches of {args.batch}",
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
