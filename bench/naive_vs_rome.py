"""Why one-forward-per-restoration tracing costs what it costs: factscope's naive path against ROME's
``trace_with_patch``, forward pass by forward pass, with one suspect changed at a time.

    python bench/naive_vs_rome.py --rome-repo ~/src/rome           # embedded model, CPU, 1 and 2 threads

The same restorations (two tokens x ten layers, hidden states, 10 noise samples plus the clean row)
run through ROME's own function (imported from the checkout, see ``bench/rome_original.py``) and
through factscope's naive step (``tracer.hooks.hooked``, ``tracer.noise.corrupting``, the clean row
copied into a clone, full logits), then through that step with one change each: no clone of the
hidden state (ROME edits in place), ROME's explicit attention mask, no key/value cache, and logits
at the last position only. Variants are interleaved round by round, so a busy machine slows them
alike; the figures are the medians over rounds of CPU and of wall milliseconds per forward pass.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results import add_result_arguments, save_result  # noqa: E402

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rome-repo", type=Path, required=True, help="a checkout of github.com/kmeng01/rome")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, each measured (default 1,2)")
    ap.add_argument("--rounds", type=int, default=3)
    add_result_arguments(ap, "naive_vs_rome")
    args = ap.parse_args()
    import torch

    from rome_original import import_rome, notes_text
    from tracer.hooks import hooked
    from tracer.models import load_model
    from tracer.noise import corrupting, draw_noise, resolve_noise
    from tracer.subject import tokenize_with_subject

    ct, notes = import_rome(args.rome_repo)
    lm = load_model("smollm2-135m", device="cpu")
    ids, span = tokenize_with_subject(lm.tokenizer, PROMPT, SUBJECT, lm.max_length)
    spec = resolve_noise(lm, "3s")
    noise = draw_noise(spec, 10, span[1] - span[0], lm.hidden_size, 1)  # ROME's RandomState(1) draw
    ct.layername = lambda model, num, kind=None: lm.layers.embed if kind == "embed" else lm.layers.name(kind or "hidden", num)
    inp = {"input_ids": torch.tensor([ids] * 11), "attention_mask": torch.ones(11, len(ids), dtype=torch.long)}
    rows = torch.tensor([ids]).expand(11, -1)
    answer = int(torch.softmax(lm.model(input_ids=rows[:1]).logits[0, -1], -1).argmax())
    cells = [(t, layer) for t in (span[1] - 1, len(ids) - 1) for layer in range(0, lm.n_layers, 3)]

    def copy_clean(t, clone):
        def fn(h):
            h = h.clone() if clone else h
            h[1:, t] = h[0, t]
            return h
        return fn

    def ours(t, layer, clone=True, mask=False, cache=None, last_only=False):
        outputs = {lm.layers.embed: corrupting(*span, noise, False, first_row=1),
                   lm.layers.name("hidden", layer): copy_clean(t, clone)}
        kwargs = {"attention_mask": inp["attention_mask"]} if mask else {}
        kwargs.update({"use_cache": cache} if cache is not None else {})
        kwargs.update({"logits_to_keep": 1} if last_only else {})
        with torch.no_grad(), hooked(lm.model, outputs=outputs):
            logits = lm.model(input_ids=rows, **kwargs).logits
        return float(torch.softmax(logits[1:, -1].float(), -1).mean(0)[answer])

    def rome(t, layer):
        return float(ct.trace_with_patch(lm.model, inp, [(t, ct.layername(lm.model, layer))], answer, span, noise=spec.scale))

    variants = {"ROME's trace_with_patch": rome, "factscope naive": ours,
                "naive, no clone": lambda t, l: ours(t, l, clone=False),
                "naive + attention mask": lambda t, l: ours(t, l, mask=True),
                "naive, use_cache=False": lambda t, l: ours(t, l, cache=False),
                "naive, last-position logits": lambda t, l: ours(t, l, last_only=True)}
    same = max(abs(rome(t, l) - ours(t, l)) for t, l in cells[:4])
    figures = {"model": "smollm2-135m", "cells": len(cells), "rows": 11, "tokens": len(ids), "rounds": args.rounds,
               "max_abs_score_difference": same, "rome_adapted": notes_text(notes, lm), "ms_per_forward": {}}
    for threads in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in variants}
        walls: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                cpu, wall = time.process_time(), time.perf_counter()
                for t, layer in cells:
                    fn(t, layer)
                times[name].append((time.process_time() - cpu) / len(cells) * 1000)
                walls[name].append((time.perf_counter() - wall) / len(cells) * 1000)
        figures["ms_per_forward"][str(threads)] = {name: statistics.median(v) for name, v in times.items()}
        figures.setdefault("wall_ms_per_forward", {})[str(threads)] = {name: statistics.median(v) for name, v in walls.items()}
        print(f"{threads} thread(s): CPU (wall) ms per forward pass, median of {args.rounds} rounds of {len(cells)} cells")
        for name, v in times.items():
            print(f"  {name:30s} {statistics.median(v):7.1f} ({statistics.median(walls[name]):7.1f})", flush=True)
    print(f"max |score difference| ROME vs factscope naive: {same:.2e}")
    save_result(args, args.result_name, figures, threads=None)


if __name__ == "__main__":
    main()
