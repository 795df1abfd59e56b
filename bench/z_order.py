"""MEMIT chunks in file order vs grouped by token length (what MEMIT does), same requests.

    OMP_NUM_THREADS=1 python bench/z_order.py --n 80 --steps 5 --repeats 2
    OMP_NUM_THREADS=1 python bench/z_order.py --stage keys --n 1000 --repeats 2

``--stage z`` (default): takes ``--n`` requests from counterfact_edit_10k.json (from ``--start``),
optimises their z with ``--steps`` v* steps (no early stop, so both orders do the same number of
steps) in chunks of the default size, once chunked in file order (the baseline: ``compute_v`` on
consecutive slices) and once through ``compute_zs`` (sorted by token extent).

``--stage keys``: reads the keys and block outputs of the update step (one edited layer, every
context template) for the same requests, once with the rows in request order (the baseline) and
once sorted by token count (what ``compute_memit`` does), in chunks of the default ``batch_rows``.

Both alternate ``--repeats`` times and print the share of real tokens among those fed, the CPU
seconds of each run and the ratio file order / grouped.
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

from results import add_result_arguments, save_result  # noqa: E402
from tracer.edit import MemitHyperParams, Request, compute_v, context_templates  # noqa: E402
from tracer.edit.keys import KeyRows, key_rows  # noqa: E402
from tracer.edit.memit import keys_and_z  # noqa: E402
from tracer.edit.zs import auto_chunk, compute_zs, extent  # noqa: E402
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
    ap.add_argument("--stage", choices=("z", "keys"), default="z")
    add_result_arguments(ap, None)
    args = ap.parse_args()
    if min(args.n, args.steps, args.repeats) < 1 or args.start < 0:
        ap.error("--n, --steps and --repeats must be >= 1 and --start >= 0")
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m")
    cases = load_cases("counterfact-10k", limit=args.start + args.n)[args.start:]
    hp = dataclasses.replace(MemitHyperParams.for_model(lm), v_steps=args.steps, early_stop_loss=0.0)
    templates = context_templates(lm, hp)
    if args.stage == "keys":
        return keys_stage(lm, [Request.coerce(c) for c in cases], hp, templates, args)
    chunk = auto_chunk(lm, hp, len(templates))
    reqs = [Request.coerce(c).edit_request() for c in cases]
    extents = [extent(lm, r)[0] for r in reqs]
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
    ratio = round(sum(cpu["file_order"]) / sum(cpu["grouped"]), 2)
    print(json.dumps({"cpu_s": cpu, "ratio_file_order_over_grouped": ratio}), flush=True)
    save_result(args, args.result_name or "z_order", {
        "stage": "z", "requests": len(reqs), "start": args.start, "steps": args.steps, "repeats": args.repeats,
        "chunk": chunk, "real_tokens": {"file_order": real_share(extents, chunk), "grouped": real_share(sorted(extents), chunk)},
        "cpu_s": cpu, "ratio_file_order_over_grouped": ratio}, threads=1)


def keys_stage(lm, reqs, hp, templates, args) -> None:
    repeats = args.repeats
    grouped = key_rows(lm, reqs, templates)
    order = grouped.where.argsort().tolist()
    in_order = KeyRows(tuple(grouped.ids[j] for j in order), tuple(grouped.lookup[j] for j in order),
                       torch.arange(len(grouped.ids)), grouped.n_requests, grouped.n_templates)
    batch_rows = 256  # compute_memit's default (no chunk_requests)
    layer, z_layer = hp.layers[0], hp.layers[-1]
    lengths = {"file_order": [len(ids) for ids in in_order.ids], "grouped": [len(ids) for ids in grouped.ids]}
    print(json.dumps({"requests": len(reqs), "rows": len(grouped.ids), "batch_rows": batch_rows, "layer": layer,
                      "real_tokens": {k: round(real_share(v, batch_rows), 3) for k, v in lengths.items()}}), flush=True)
    cpu = {"file_order": [], "grouped": []}
    out = {}
    for _ in range(repeats):
        for name, rows in (("file_order", in_order), ("grouped", grouped)):
            t = time.process_time()
            out[name] = keys_and_z(lm, rows, layer, z_layer, batch_rows)
            cpu[name].append(round(time.process_time() - t, 1))
    diff = max(float((a - b).abs().max()) for a, b in zip(out["file_order"], out["grouped"]))
    ratio = round(sum(cpu["file_order"]) / sum(cpu["grouped"]), 2)
    print(json.dumps({"cpu_s": cpu, "max_abs_difference": diff, "ratio_file_order_over_grouped": ratio}), flush=True)
    save_result(args, args.result_name or "z_order_keys", {
        "stage": "keys", "requests": len(reqs), "start": args.start, "rows": len(grouped.ids), "batch_rows": batch_rows,
        "layer": layer, "repeats": repeats,
        "real_tokens": {k: real_share(v, batch_rows) for k, v in lengths.items()},
        "cpu_s": cpu, "ratio_file_order_over_grouped": ratio, "max_abs_difference": diff}, threads=1)


if __name__ == "__main__":
    main()
