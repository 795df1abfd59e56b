"""Precision and placement of a causal trace on the embedded model: where the peaks land and how long it takes.

    OMP_NUM_THREADS=2 python bench/precision.py [--dtypes float32,bfloat16] [--kinds hidden,mlp,attn]

Traces one prompt (same noise draw: same seed, samples and scale) with the weights in each dtype,
loaded from the cached float32 conversion of the GGUF, and once more in float32 with
``device_map="auto", max_memory={"cpu": "300MiB"}`` (the rest offloaded to disk). For each run
and kind: the peak cell (token, layer, score), the five strongest cells, the clean and corrupted
scores, the largest cell difference from the float32 trace, wall and CPU seconds.
Writes ``bench/results/precision.json``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.models import load_model  # noqa: E402
from tracer.trace import trace_all  # noqa: E402

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


def run(name: str, lm, args, reference) -> tuple[dict, dict]:
    wall, cpu = time.perf_counter(), time.process_time()
    traces = trace_all(lm, args.prompt, args.subject, kinds=tuple(args.kinds.split(",")), samples=args.samples,
                       seed=args.seed, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    kinds = {}
    for kind, r in traces.items():
        t, layer, score = r.strongest(1)[0]
        row = {"peak": {"token": int(t), "token_text": r.tokens[t], "layer": int(layer), "score": float(score)},
               "top5": [[int(a), int(b)] for a, b, _ in r.strongest(5)],
               "high_score": r.high_score, "low_score": r.low_score, "answer": r.answer}
        if reference is not None:
            ref = reference[kind]
            row["max_abs_cell_difference"] = float(np.nanmax(np.abs(r.scores - ref.scores)))
            row["same_peak"] = row["peak"]["token"] == ref.strongest(1)[0][0] and row["peak"]["layer"] == ref.strongest(1)[0][1]
            row["top5_shared"] = len({tuple(c) for c in row["top5"]} & {(a, b) for a, b, _ in ref.strongest(5)})
        kinds[kind] = row
        peak = row["peak"]
        print(f"{name:<22} {kind:6s} peak {peak['token_text']!r}@L{peak['layer']}={peak['score']:.3f}  "
              f"clean {r.high_score:.4f}  corrupted {r.low_score:.4f}"
              + (f"  max|cell - float32| {row['max_abs_cell_difference']:.2e}  top-5 shared {row['top5_shared']}/5"
                 if reference is not None else ""), flush=True)
    print(f"{name:<22} {wall:.1f} s wall, {cpu:.1f} CPU-s", flush=True)
    return {"name": name, "wall_s": wall, "cpu_s": cpu, "kinds": kinds}, traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--subject", default=SUBJECT)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list; float32 first (the reference)")
    ap.add_argument("--kinds", default="hidden,mlp,attn")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-memory", default="cpu=300MiB", help="CPU budget of the offloaded run")
    ap.add_argument("--no-offload", action="store_true", help="skip the offloaded float32 run")
    add_result_arguments(ap, "precision")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "float32":
        ap.error("--dtypes must start with float32, the reference")
    runs, reference = [], None
    for dtype in dtypes:
        row, traces = run(dtype, load_model("smollm2-135m", device="cpu", dtype=dtype), args, reference)
        reference = reference or traces
        runs.append(row)
    if not args.no_offload:
        with tempfile.TemporaryDirectory() as folder:
            lm = load_model("smollm2-135m", dtype="float32", device_map="auto", max_memory=args.max_memory,
                            offload_folder=folder)
            placed = sorted({str(d) for d in lm.model.hf_device_map.values()})
            row, _ = run(f"float32 offloaded ({'+'.join(placed)})", lm, args, reference)
            row["device_map"] = {k: str(v) for k, v in lm.model.hf_device_map.items()}
            runs.append(row)
    save_result(args, args.result_name, {"prompt": args.prompt, "subject": args.subject, "samples": args.samples,
                                         "seed": args.seed, "max_memory": args.max_memory, "runs": runs},
                threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
