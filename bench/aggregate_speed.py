"""Aggregation speed: numba kernels vs the pure NumPy path, same numbers, same run.

    python bench/aggregate_speed.py [--sizes 1000 100000] [--n-boot 100] [--layers 30]

Synthetic traces (random lengths 4-20 tokens, random subject spans, ``--layers`` layers) are
bucketed and averaged (point estimate) and bootstrapped (``--n-boot`` resamples of the facts) by
both back-ends of :mod:`tracer.aggregate`; the script checks the results are identical and prints
the times and the NumPy/numba ratio. Single-threaded (numba kernels are serial; NumPy is pinned
to one thread through the environment when set before start, see below). JIT compilation is
timed separately (first call; cached on disk afterwards).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from results import add_result_arguments, save_result  # noqa: E402
from tracer.aggregate import RaggedTraces, bucket_effects  # noqa: E402


def synthetic(n_facts: int, n_layers: int, seed: int = 0) -> RaggedTraces:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 21, n_facts)
    start = (rng.random(n_facts) * (lengths - 1)).astype(np.int64)
    end = start + 1 + (rng.random(n_facts) * (lengths - start)).astype(np.int64)
    end = np.minimum(end, lengths)
    scores = rng.random((int(lengths.sum()), n_layers))
    return RaggedTraces.build(scores, np.concatenate([[0], np.cumsum(lengths)]), start, end,
                              rng.random(n_facts) * 0.1, rng.random(n_facts))


def best_of(fn, repeat: int) -> tuple[float, dict]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    p.add_argument("--n-boot", type=int, default=100)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeat", type=int, default=3)
    add_result_arguments(p, "aggregate_speed")
    args = p.parse_args()

    t0 = time.perf_counter()
    bucket_effects(synthetic(10, args.layers), n_boot=2, backend="numba")
    jit_s = time.perf_counter() - t0
    print(f"numba first call (JIT or cache load): {jit_s:.2f} s")
    rows = []
    print(f"{'facts':>8} {'stage':<22} {'numpy s':>9} {'numba s':>9} {'ratio':>7}  identical")
    for n in args.sizes:
        r = synthetic(n, args.layers)
        repeat = args.repeat if n <= 10000 else 1
        for stage, n_boot in (("buckets + means", 0), (f"+ bootstrap x{args.n_boot}", args.n_boot)):
            t_np, a = best_of(lambda: bucket_effects(r, n_boot=n_boot, backend="numpy"), repeat)
            t_nb, b = best_of(lambda: bucket_effects(r, n_boot=n_boot, backend="numba"), repeat)
            same = all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
            print(f"{n:>8} {stage:<22} {t_np:>9.3f} {t_nb:>9.3f} {t_np / t_nb:>6.1f}x  {same}", flush=True)
            rows.append({"facts": n, "stage": stage, "numpy_s": t_np, "numba_s": t_nb, "ratio": t_np / t_nb,
                         "identical": bool(same)})
    save_result(args, args.result_name, {"layers": args.layers, "n_boot": args.n_boot, "repeat": args.repeat,
                                         "numba_first_call_s": jit_s, "rows": rows}, threads=1)


if __name__ == "__main__":
    main()
