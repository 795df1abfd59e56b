"""MEMIT z chunks in file order vs grouped by token length (what ``compute_zs`` does), same requests.

    OMP_NUM_THREADS=1 python bench/z_order.py --n 80 --steps 5 --repeats 2

Takes ``--n`` requests from counterfact_edit_10k.json (from ``--start``), optimises their z with
``--steps`` v* steps (no early stop, so both orders do the same number of steps) in chunks of the
default size, once chunked in file order (the baseline: ``compute_v`` on consecutive slices) and once
through ``compute_zs`` (sorted by token extent), alternating ``--repeats`` times. Prints the share of
real tokens among those fed, the CPU seconds of each run and the ratio file order / grouped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracer.edit.memit import MemitHyperParams, Request, _auto_chunk, _extent, compute_zs, context_templates  # noqa: E402
from tracer.edit.rome import compute_v  # noqa: E402
from tracer.evaluate import load_cases  # noqa: E402
from tracer.models import load_model  # noqa: E402


def real_share(extents: list[int], chunk: int) -> float:
    """Real tokens / fed tokens when each chunk is padded to its longest extent."""
    fed = sum(len(extents[s:s + chunk]) * max(extents[s:s + chunk]) for s in range(0, len(extents), chunk))
    return sum(extents) / fed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--start", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if min(args.n, args.steps, args.repeats) < 1 or args.start < 0:
        ap.error("--n, --steps and --repeats must be >= 1 and --start >= 0")
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m")
    cases = load_cases("counterfact-10k", limit=args.start + args.n)[args.start:]
    hp = dataclasses.replace(MemitHyperParams.for_model(lm), v_steps=args.steps, early_stop_loss=0.0)
    templates = context_templates(lm, hp)
    chunk = _auto_chunk(lm, hp, len(templates))
    reqs = [Request.coerce(c).edit_request() for c in cases]
    extents = [_extent(lm, r)[0] for r in reqs]
    print(json.dumps({"requests": len(reqs), "chunk": chunk, "steps": args.steps,
                      "real_tokens": {"file_order": round(real_share(extents, chunk), 3),
                                      "grouped": round(real_share(sorted(extents), chunk), 3)}}), flush=True)
    rhp = hp.rome_hparams()
    cpu = {"file_order": [], "grouped": []}
    for _ in range(args.repeats):
        t = time.process_time()
        for s in range(0, len(reqs), chunk):
            compute_v(lm, hp.layers[-1], reqs[s:s + chunk], templates, rhp, reference="hidden")
        cpu["file_order"].append(round(time.process_time() - t, 1))
        t = time.process_time()
        compute_zs(lm, cases, hp, templates, progress=False)
        cpu["grouped"].append(round(time.process_time() - t, 1))
    print(json.dumps({"cpu_s": cpu, "ratio_file_order_over_grouped":
                      round(sum(cpu["file_order"]) / sum(cpu["grouped"]), 2)}), flush=True)


if __name__ == "__main__":
    main()
