"""Batched causal tracing vs one forward pass per restoration (the original code's way).

    python bench/trace_speed.py                 # 5 known facts, all kinds, embedded model, CPU
    python bench/trace_speed.py --facts 2 --threads 1
    python bench/trace_speed.py --device cuda --random-config gpt2-xl   # speed only, random weights

Each mode runs in its own subprocess (so peak resident memory is its own); both use the same
facts, settings and thread count in the same run, and the script prints time, forward passes,
peak memory, the speed ratio and the largest score difference between the modes.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def _run(args, naive: bool, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from tracer.trace import trace_all

    lm = _load(args)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started, forwards, scores = time.perf_counter(), 0, []
    for fact in _facts(args.facts):
        results = trace_all(lm, fact["prompt"], fact["subject"], samples=args.samples, naive=naive,
                            noise=0.35 if args.random_config else "3s", progress=False)
        forwards += sum(r.n_forward for r in results.values())
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        scores.append({k: r.scores.tolist() for k, r in results.items()})
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() / 2**20 if lm.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    queue.put({"seconds": seconds, "forwards": forwards, "peak_mib": peak, "scores": scores, "device": lm.device.type})


def _measure(args, naive: bool) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_run, args=(args, naive, queue))
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
    add_result_arguments(ap, None)
    args = ap.parse_args()
    import numpy as np

    batched = _measure(args, naive=False)
    naive = _measure(args, naive=True)
    diff = max(float(np.abs(np.array(a[k]) - np.array(b[k])).max())
               for a, b in zip(batched["scores"], naive["scores"]) for k in a)
    model = args.random_config or "smollm2-135m"
    print(f"trace_speed: {args.facts} facts x 3 kinds, samples={args.samples}, model={model}, "
          f"device={args.device or 'auto'}, torch threads={args.threads}")
    for name, r in (("naive (one forward per restoration)", naive), ("batched", batched)):
        print(f"  {name:38s} {r['seconds']:8.1f} s  {r['forwards']:6d} forward passes  peak {r['peak_mib']:8.0f} MiB")
    print(f"  speed-up batched vs naive: {naive['seconds'] / batched['seconds']:.2f}x   "
          f"max |score difference| {diff:.2e}")
    device = batched["device"]
    name = args.result_name or ("trace_speed" if (model, device) == ("smollm2-135m", "cpu") else f"trace_speed_{model}_{device}")
    figures = {"model": model, "device": device, "facts": args.facts, "samples": args.samples,
               "kinds": ["hidden", "mlp", "attn"], "fact_prompts": [f["prompt"] for f in _facts(args.facts)],
               **{mode: {k: r[k] for k in ("seconds", "forwards", "peak_mib")} for mode, r in (("naive", naive), ("batched", batched))},
               "max_abs_score_difference": diff}
    save_result(args, name, figures, threads=args.threads)


if __name__ == "__main__":
    main()
