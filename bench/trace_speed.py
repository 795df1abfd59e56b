"""Batched causal tracing vs one forward pass per restoration (the original code's way).

    python bench/trace_speed.py                 # 5 known facts, all kinds, embedded model, CPU
    python bench/trace_speed.py --facts 2 --threads 1
    python bench/trace_speed.py --device cuda --random-config gpt2-xl   # speed only, random weights
    python bench/trace_speed.py --rome-repo ~/src/rome   # also ROME's own code, from that checkout

Each mode runs in its own subprocess (so peak resident memory is its own); all use the same
facts, settings and thread count in the same run, and the script prints time, CPU time, forward
passes, peak memory, the speed ratios and the largest score difference from the batched engine.
With ``--rome-repo DIR`` a third mode imports ``experiments/causal_trace.py`` from that checkout of
https://github.com/kmeng01/rome (nothing of it is copied here; ``bench/rome_original.py`` says
what is adapted) and times its ``calculate_hidden_flow`` per kind, so the headline ratio is against
the original implementation. Without ``--result-name`` such a run writes ``trace_speed_rome``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # rome_original (spawned workers too)

from results import add_result_arguments, save_result  # noqa: E402
from tracer.datapaths import KNOWNS, data_file  # noqa: E402


def _facts(n: int) -> list[dict]:
    known = json.loads(data_file(KNOWNS).read_text())
    return known[:n]


def _load(args):
    import torch

    from tracer.models import load_model

    if args.random_config:
        from transformers import AutoModelForCausalLM, GPT2Config

        from tracer.layers import layer_map_for
        from tracer.models import LanguageModel

        configs = {"gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25, n_positions=1024)}
        base = load_model("smollm2-135m", device="cpu")  # any byte-level tokenizer will do for speed
        cfg = configs[args.random_config]
        cfg.vocab_size = len(base.tokenizer)
        model = AutoModelForCausalLM.from_config(cfg).to(args.device or "cpu").eval().requires_grad_(False)
        return LanguageModel(model, base.tokenizer, layer_map_for(model), args.random_config)
    return load_model("smollm2-135m", device=args.device, dtype=torch.float32)


def _run(args, mode: str, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from tracer.noise import resolve_noise
    from tracer.trace import trace_all
    from tracer.trace_result import KINDS

    lm = _load(args)
    if mode == "rome":
        from rome_original import import_rome, notes_text, rome_trace

        ct, notes = import_rome(args.rome_repo)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started, cpu, forwards, scores = time.perf_counter(), time.process_time(), 0, []
    for fact in _facts(args.facts):
        noise = 0.35 if args.random_config else "3s"
        if mode == "rome":  # ROME takes the scale itself: the same 3 x subject-embedding std
            scale = resolve_noise(lm, noise).scale
            got = {k: rome_trace(ct, lm, fact["prompt"], fact["subject"], k, args.samples, scale)[0] for k in KINDS}
            forwards += sum(s.size + 2 for s in got.values())  # one per cell, plus its clean and corrupted runs
            scores.append({k: v.tolist() for k, v in got.items()})
        else:
            results = trace_all(lm, fact["prompt"], fact["subject"], samples=args.samples, naive=mode == "naive",
                                noise=noise, progress=False)
            forwards += sum(r.n_forward for r in results.values())
            scores.append({k: r.scores.tolist() for k, r in results.items()})
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = (torch.cuda.max_memory_allocated() / 2**20 if lm.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    queue.put({"seconds": seconds, "cpu_seconds": cpu, "forwards": forwards, "peak_mib": peak, "scores": scores,
               "device": lm.device.type, **({"adapted": notes_text(notes, lm)} if mode == "rome" else {})})


def _measure(args, mode: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_run, args=(args, mode, queue))
    p.start()
    out = queue.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=5)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--random-config", choices=["gpt2-xl"], default=None)
    ap.add_argument("--rome-repo", type=Path, default=None,
                    help="a checkout of github.com/kmeng01/rome: also time ROME's own causal tracing code")
    add_result_arguments(ap, None)
    args = ap.parse_args()
    import numpy as np

    modes = ("batched", "naive") + (("rome",) if args.rome_repo else ())
    runs = {mode: _measure(args, mode) for mode in modes}
    batched = runs["batched"]

    def diff(other: dict) -> float:
        return max(float(np.nanmax(np.abs(np.array(a[k]) - np.array(b[k])))) for a, b in zip(batched["scores"], other["scores"])
                   for k in a)

    model = args.random_config or "smollm2-135m"
    print(f"trace_speed: {args.facts} facts x 3 kinds, samples={args.samples}, model={model}, "
          f"device={args.device or 'auto'}, torch threads={args.threads}")
    labels = {"rome": "ROME's own code (calculate_hidden_flow)", "naive": "naive (one forward per restoration)",
              "batched": "batched"}
    for mode, r in runs.items():
        print(f"  {labels[mode]:40s} {r['seconds']:8.1f} s  cpu {r['cpu_seconds']:8.1f} s  {r['forwards']:6d} forward passes"
              f"  peak {r['peak_mib']:8.0f} MiB")
    for mode in modes[1:]:
        print(f"  speed-up batched vs {mode}: {runs[mode]['seconds'] / batched['seconds']:.2f}x wall, "
              f"{runs[mode]['cpu_seconds'] / batched['cpu_seconds']:.2f}x CPU   max |score difference| {diff(runs[mode]):.2e}")
    device = batched["device"]
    default = "trace_speed" if (model, device) == ("smollm2-135m", "cpu") else f"trace_speed_{model}_{device}"
    name = args.result_name or (default.replace("trace_speed", "trace_speed_rome", 1) if args.rome_repo else default)
    figures = {"model": model, "device": device, "facts": args.facts, "samples": args.samples,
               "kinds": ["hidden", "mlp", "attn"], "fact_prompts": [f["prompt"] for f in _facts(args.facts)],
               **{mode: {k: r[k] for k in ("seconds", "cpu_seconds", "forwards", "peak_mib")} for mode, r in runs.items()},
               "max_abs_score_difference": diff(runs["naive"]),
               "load_average": list(os.getloadavg())}
    if args.rome_repo:
        figures["rome_max_abs_score_difference"] = diff(runs["rome"])
        figures["rome_adapted"] = runs["rome"]["adapted"]
    save_result(args, name, figures, threads=args.threads)


if __name__ == "__main__":
    main()
