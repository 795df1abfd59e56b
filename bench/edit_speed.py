"""Time and peak memory of one ROME edit on the embedded model, next to ROME's unoptimised steps.

    python bench/edit_speed.py [--threads 1] [--stats-tokens 20000] [--steps 20]

Each phase runs in its own process (so peak RSS is that phase's own), with a fixed torch
thread count (say it when quoting numbers; on a busy 2-core machine 1 thread is fastest):

- ``load``        load the model only (the memory baseline)
- ``stats-cold``  compute key statistics C (``--stats-tokens``) and write them to a fresh cache
- ``stats-warm``  load the same statistics from the cache (verified)
- ``edit-fast``   rome_edit with cached C: prefix-cached v* optimisation (this package's default)
- ``edit-rome``   the same edit with ROME's forward (whole model, right-padded rows, full logits)

Ratios are measured in the same run; wall-clock numbers on shared machines are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from results import add_result_arguments, save_result  # noqa: E402  (bench/ is the script's folder)

PHASES = ("load", "stats-cold", "stats-warm", "edit-fast", "edit-rome")


def _phase(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from tracer.edit import EditRequest, ROMEHyperParams, rome_edit
    from tracer.models import load_model
    from tracer.stats import StatsCache

    lm = load_model("smollm2-135m", device="cpu")
    hp = ROMEHyperParams.for_model(lm, v_num_grad_steps=args.steps, stats_tokens=args.stats_tokens)
    cache = StatsCache(args.cache)
    out = {"phase": name}
    t = time.perf_counter()
    if name.startswith("stats"):
        stats = cache.get(lm, hp.layer, args.stats_tokens, progress=False)
        out["n_tokens"] = stats.n_tokens
    elif name.startswith("edit"):
        request = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")
        record = rome_edit(lm, request, hp, stats=cache, engine="fast" if name == "edit-fast" else "reference", progress=False)
        out.update(after=record.after, loss=record.loss[-1], steps=len(record.loss),
                   v_star_s=record.seconds["v_star"])
    out["seconds"] = time.perf_counter() - t
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stats-tokens", type=int, default=20_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    add_result_arguments(p, "edit_speed")
    args = p.parse_args()
    if args.phase:
        print(json.dumps(_phase(args.phase, args)))
        return
    with tempfile.TemporaryDirectory() as cache:
        results = {}
        for name in PHASES:
            cmd = [sys.executable, __file__, "--phase", name, "--cache", cache, "--threads", str(args.threads),
                   "--stats-tokens", str(args.stats_tokens), "--steps", str(args.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if done.returncode != 0:
                sys.exit(f"phase {name} failed:\n{done.stderr[-2000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["load"]["peak_rss_mb"]
    print(f"ROME edit on smollm2-135m, {args.threads} torch thread(s), {args.steps} v* steps, C from {args.stats_tokens:,} tokens")
    print(f"{'phase':<12} {'seconds':>8} {'peak RSS MB':>12} {'over load':>10}")
    for name in PHASES:
        r = results[name]
        print(f"{name:<12} {r['seconds']:8.1f} {r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] - base:10.0f}")
    fast, rome = results["edit-fast"], results["edit-rome"]
    print(f"v* optimisation: {fast['v_star_s']:.1f} s fast vs {rome['v_star_s']:.1f} s ROME's forward "
          f"= {rome['v_star_s'] / fast['v_star_s']:.1f}x; whole edit {rome['seconds'] / fast['seconds']:.1f}x")
    print(f"statistics: cold {results['stats-cold']['seconds']:.1f} s, cached {results['stats-warm']['seconds']:.2f} s")
    print(f"after the edit: fast {fast['after']}, ROME's forward {rome['after']}")
    save_result(args, args.result_name, {
        "model": "smollm2-135m", "steps": args.steps, "stats_tokens": args.stats_tokens,
        "v_star_s": {"fast": fast["v_star_s"], "reference": rome["v_star_s"]},
        "peak_over_load_mb": {"fast": fast["peak_rss_mb"] - base, "reference": rome["peak_rss_mb"] - base},
        "phases": results}, threads=args.threads)


if __name__ == "__main__":
    main()
