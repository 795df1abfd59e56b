"""Is bfloat16 worth it for causal traces on this CPU? Speed and error against float32, same run.

    OMP_NUM_THREADS=1 python bench/trace_precision.py [--fact 5] [--kind hidden]

Prints the float32 / bfloat16 throughput of a hidden x MLP sized matrix product on one core, then
traces one known fact (``out/knowns.json`` when present, else ROME's first known fact) three ways:
float32 (the reference), float32 weights under ``torch.autocast("cpu", torch.bfloat16)``, and the
model in bfloat16. For each: CPU seconds, speed-up over float32, clean answer probability and the
largest cell difference from the float32 trace.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer import load_model  # noqa: E402
from tracer.datapaths import KNOWNS, data_file  # noqa: E402
from tracer.trace import trace  # noqa: E402


def gemm_gflops(dtype: torch.dtype, rows: int = 4096, n: int = 20) -> float:
    a, b = torch.randn(rows, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * rows * 576 * 1536 * n / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fact", type=int, default=5, help="index into the known facts")
    ap.add_argument("--kind", default="hidden", choices=("hidden", "mlp", "attn"))
    add_result_arguments(ap, "trace_precision")
    args = ap.parse_args()
    torch.set_num_threads(1)
    f32, bf16 = gemm_gflops(torch.float32), gemm_gflops(torch.bfloat16)
    print(f"matrix product GFLOP/s on one core: float32 {f32:.0f}, bfloat16 {bf16:.0f} ({bf16 / f32:.1f}x)")
    knowns = Path("out/knowns.json")
    facts = json.loads(knowns.read_text())["facts"] if knowns.is_file() else \
        json.loads(data_file(KNOWNS).read_text())
    fact = facts[args.fact]
    print(f"fact: {fact['prompt']!r} (subject {fact['subject']!r}), kind {args.kind}")
    ref, runs = None, []
    for name, dtype, ctx in (("float32", torch.float32, nullcontext),
                             ("autocast bf16", torch.float32, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
                             ("bfloat16 model", torch.bfloat16, nullcontext)):
        lm = load_model("smollm2-135m", device="cpu", dtype=dtype)
        t = time.process_time()
        with ctx():
            r = trace(lm, fact["prompt"], fact["subject"], args.kind, progress=False)
        cpu = time.process_time() - t
        if ref is None:
            ref, ref_cpu = r, cpu
        diff = float(np.nanmax(np.abs(r.scores - ref.scores)))
        print(f"{name:<15} {cpu:6.1f} CPU-s  x{ref_cpu / cpu:.2f}  clean p {r.high_score:.4f} "
              f"({(r.high_score / ref.high_score - 1) * 100:+.0f} %)  max |cell - float32| {diff:.4f}")
        runs.append({"name": name, "cpu_s": cpu, "speedup": ref_cpu / cpu, "clean_p": r.high_score,
                     "max_abs_cell_difference": diff})
    save_result(args, args.result_name, {"gemm_gflops": {"float32": f32, "bfloat16": bf16}, "fact": fact["prompt"],
                                         "kind": args.kind, "runs": runs}, threads=1)


if __name__ == "__main__":
    main()
