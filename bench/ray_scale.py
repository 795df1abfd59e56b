"""The dataset trace on 1 and on 2 local Ray workers: speed-up and scheduling overhead per item.

    OMP_NUM_THREADS=1 python bench/ray_scale.py                 # 8 known facts, hidden, 3 samples
    python bench/ray_scale.py --facts 4 --samples 2 --no-result  # a quick look

One local Ray cluster (``--cpus`` logical CPUs, default this machine's) serves both runs, in
this order: a pool of 1 worker, then a pool of 2, each worker the embedded model with one torch
thread. Each run traces the same facts (``trace_dataset`` through the pool, files written by
this process) into a fresh folder; its wall time counts from the first task to the last file,
without the pool's start (reported apart: Ray workers start and load the model once). Printed
and written to ``bench/results/ray_scale.json``:

- ``speedup``: wall(1 worker) / wall(2 workers) (the aim on 2 idle cores: ≥ 1.7×);
- ``overhead_per_item_s``: 2 × wall(2) − Σ per-fact seconds measured in the workers, per fact:
  what the driver adds (scheduling, transfers, writing files) plus the workers' idle tail;
- ``round_trip_s``: the time one empty task takes through the pool (200 of them, one at a time
  per worker): the scheduling cost alone;
- whether the two runs wrote the same ``facts/*.json`` bytes, and the load average, since a
  busy machine lowers the speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.datapaths import KNOWNS, data_file  # noqa: E402


def _noop(lm, payload, shared):
    return payload


def _run(pool, facts: list[dict], samples: int, out: Path) -> dict:
    from tracer.dataset_trace import trace_dataset

    t = time.perf_counter()
    summary = trace_dataset(pool, facts, out, kinds=("hidden",), samples=samples, progress=False)
    wall = time.perf_counter() - t
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    busy = sum(r["seconds"] for r in log)
    n = len(log)
    t = time.perf_counter()
    list(pool.map(_noop, [(i, i) for i in range(200)], progress=False))
    round_trip = (time.perf_counter() - t) * pool.workers / 200
    return {"workers": pool.workers, "traced": summary.traced, "wall_s": round(wall, 2),
            "task_s": round(busy, 2), "task_cpu_s": round(sum(r["cpu_seconds"] for r in log), 2),
            "overhead_per_item_s": round((pool.workers * wall - busy) / n, 3),
            "round_trip_s": round(round_trip, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=8, help="the first N known facts (default 8)")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=None, help="logical CPUs of the local cluster (default: this machine's)")
    add_result_arguments(ap, "ray_scale")
    args = ap.parse_args()
    import ray

    from tracer.spread import RayPool

    facts = json.loads(data_file(KNOWNS).read_text())[:args.facts]
    cpus = args.cpus or len(os.sched_getaffinity(0))
    t = time.perf_counter()
    ray.init(address="local", num_cpus=max(2, cpus), include_dashboard=False, logging_level="WARNING")
    cluster_s = time.perf_counter() - t
    runs, outs = {}, {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for workers in (1, 2):
                t = time.perf_counter()
                with RayPool("smollm2-135m", workers=workers, threads=1, device="cpu") as pool:
                    start_s = time.perf_counter() - t
                    outs[workers] = Path(tmp) / f"w{workers}"
                    runs[workers] = {**_run(pool, facts, args.samples, outs[workers]), "pool_start_s": round(start_s, 2)}
                print(json.dumps(runs[workers]), flush=True)
            same = all((outs[1] / "facts" / p.name).read_bytes() == p.read_bytes()
                       for p in (outs[2] / "facts").glob("*.json"))
    finally:
        ray.shutdown()
    speedup = runs[1]["wall_s"] / runs[2]["wall_s"]
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"ray_scale: {args.facts} facts, hidden, samples={args.samples}, embedded model, 1 torch thread per worker; "
          f"cluster start {cluster_s:.1f} s; load average {load}")
    for w, r in runs.items():
        print(f"  {w} worker{'s' if w > 1 else ' '}: {r['wall_s']:7.1f} s  (pool start {r['pool_start_s']:.1f} s, "
              f"overhead {r['overhead_per_item_s']:.3f} s/fact, round trip {r['round_trip_s'] * 1000:.1f} ms)")
    print(f"  speed-up 2 vs 1 worker: {speedup:.2f}x   same facts/*.json: {same}")
    figures = {"model": "smollm2-135m", "facts": args.facts, "kind": "hidden", "samples": args.samples,
               "cluster_cpus": max(2, cpus), "cluster_start_s": round(cluster_s, 2), "runs": [runs[1], runs[2]],
               "speedup": round(speedup, 3), "same_files": same, "load_average": load}
    save_result(args, args.result_name or "ray_scale", figures, threads=1)


if __name__ == "__main__":
    main()
