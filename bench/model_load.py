"""Load time and memory of the embedded models: the first load (GGUF conversion) and a cached one.

    python bench/model_load.py [--models smollm2-135m,gemma3-270m] [--threads 1] [--cold]

Each load runs in its own process, so its peak RSS is its own:

- ``cold`` (with ``--cold``): a fresh, empty ``$FACTSCOPE_CACHE``: the GGUF is (joined from its
  chunks,) dequantised, written and verified; what a first ``load_model(alias)`` costs
- ``warm``: the cached conversion is verified (SHA-256 of the GGUF and of the weights) and loaded

Each process then runs one forward pass on "The Eiffel Tower is located in the city of" and
records the answer, its probability and the RSS after it (the weights are memory-mapped: pages
count once they are read). Wall-clock numbers on shared machines are noisy: say what else ran.
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
from pathlib import Path

from results import add_result_arguments, save_result  # noqa: E402  (bench/ is the script's folder)

PROMPT = "The Eiffel Tower is located in the city of"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _load(alias: str, threads: int, fresh: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    from tracer.models import cache_dir, load_model

    t = time.perf_counter()
    lm = load_model(alias, device="cpu")
    seconds = time.perf_counter() - t
    out = {"model": alias, "seconds": seconds, "rss_loaded_mb": _rss_mb(),
           "peak_rss_loaded_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "layers": lm.n_layers, "hidden": lm.hidden_size,
           "parameters": sum(p.numel() for p in lm.model.parameters())}
    if fresh:  # the cache was empty: it holds this model's entry alone
        out["cache_mb"] = sum(f.stat().st_size for f in (cache_dir() / "models").rglob("*") if f.is_file()) / 2 ** 20
    with torch.no_grad():
        probs = lm.model(torch.tensor([lm.encode(PROMPT)])).logits[0, -1].float().softmax(-1)
    top = int(probs.argmax())
    out.update(answer=lm.decode(top), p=float(probs[top]), rss_after_forward_mb=_rss_mb(),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _run(alias: str, threads: int, env: dict, fresh: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--phase", alias, "--threads", str(threads)] + (["--cold"] if fresh else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        sys.exit(f"loading {alias} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,gemma3-270m", help="comma list of embedded model aliases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cold", action="store_true", help="also time the first load, on an empty cache")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    add_result_arguments(p, "model_load")
    args = p.parse_args()
    if args.phase:
        print(json.dumps(_load(args.phase, args.threads, args.cold)))
        return
    rows = []
    for alias in args.models.split(","):
        row = {"model": alias}
        if args.cold:
            with tempfile.TemporaryDirectory() as cache:
                row["cold"] = _run(alias, args.threads, {**os.environ, "FACTSCOPE_CACHE": cache}, fresh=True)
        _run(alias, args.threads, dict(os.environ))  # make sure the default cache holds it
        row["warm"] = _run(alias, args.threads, dict(os.environ))
        rows.append(row)
        for kind in ("cold", "warm"):
            if kind in row:
                r = row[kind]
                print(f"{alias:<14} {kind}: {r['seconds']:6.1f} s, RSS {r['rss_loaded_mb']:,.0f} MB loaded, "
                      f"{r['rss_after_forward_mb']:,.0f} MB after a forward pass, peak {r['peak_rss_mb']:,.0f} MB; "
                      f"{r['answer']!r} {r['p']:.4f}")
    save_result(args, args.result_name, {"prompt": PROMPT, "rows": rows}, threads=args.threads)


if __name__ == "__main__":
    main()
