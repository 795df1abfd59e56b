"""Does localisation inform editing on the embedded model? (Hase et al., 2023, asked it of GPT-J.)

    OMP_NUM_THREADS=1 python bench/layer_sweep.py --facts 50 --layers 0-12 --out out/layer_sweep
    python bench/layer_sweep.py --facts 50 --layers 0-12:2 --minutes 20 --out out/layer_sweep   # what fits 20 minutes

CounterFact records the model knows (:data:`tracer.knowns.RULE` with the true object as the
attribute), in file order, each swept with :func:`tracer.layer_sweep.layer_sweep`: the MLP trace
at the last subject token (``--samples`` noise samples) and a ROME edit at each layer (the
model's ROME defaults, C from the statistics cache), measured as ``factscope evaluate`` measures.
One JSON per fact under ``--out`` (a rerun skips finished facts; ``--minutes`` stops starting new
ones after that long), then :func:`tracer.layer_sweep.localisation_correlation` over every finished
fact for Hase et al.'s rewrite score, the paraphrase score, the neighbourhood score and ES-g,
written to ``bench/results/layer_sweep.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.edit.statistics import statistics_at  # noqa: E402
from tracer.edit.hparams import ROMEHyperParams  # noqa: E402
from tracer.evaluate import load_cases  # noqa: E402
from tracer.files import write_json_atomic  # noqa: E402
from tracer.knowns import filter_known  # noqa: E402
from tracer.layer_sweep import LayerSweep, layer_sweep, localisation_correlation  # noqa: E402
from tracer.models import load_model  # noqa: E402

SCORES = ("rewrite_score", "paraphrase_score", "neighborhood_success", "rewrite_gen_success")


def parse_layers(text: str) -> list[int]:
    """``0-12``, ``0-12:2`` (every second layer) or ``2,4,6``."""
    if "-" in text:
        span, _, step = text.partition(":")
        a, b = span.split("-")
        return list(range(int(a), int(b) + 1, int(step or 1)))
    return [int(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=50, help="known CounterFact facts to sweep")
    ap.add_argument("--scan", type=int, default=400, help="CounterFact records to check for known facts")
    ap.add_argument("--layers", default="0-12")
    ap.add_argument("--samples", type=int, default=5, help="noise samples of each trace")
    ap.add_argument("--minutes", type=float, default=None, help="start no new fact after this many minutes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("out/layer_sweep"))
    add_result_arguments(ap, "layer_sweep")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = parse_layers(args.layers)
    lm = load_model(args.model, device="cpu")
    cases = load_cases("counterfact", limit=args.scan)
    known = filter_known(lm, [{"known_id": c.case_id, "prompt": c.rewrite_prompt, "subject": c.subject,
                               "attribute": c.target_true} for c in cases], progress=False)
    ids = {f["known_id"] for f in known.facts}
    chosen = [c for c in cases if c.case_id in ids][:args.facts]
    print(f"{len(ids)} of {len(cases)} records known; sweeping {len(chosen)} over layers {layers}", flush=True)
    t = time.perf_counter()
    for layer in layers:  # C once per layer, before the clock of the sweeps
        statistics_at(lm, layer, None, ROMEHyperParams.for_model(lm).stats_tokens)
    stats_s = time.perf_counter() - t
    start = time.perf_counter()  # --minutes counts the sweeps only
    args.out.mkdir(parents=True, exist_ok=True)
    for case in chosen:
        path = args.out / f"{case.case_id}.json"
        if path.is_file():
            continue
        if args.minutes is not None and time.perf_counter() - start > 60 * args.minutes:
            print("time budget spent; stopping", flush=True)
            break
        sweep = layer_sweep(lm, case, layers, samples=args.samples, progress=False)
        write_json_atomic(path, sweep.to_dict(), indent=1)
        print(f"case {case.case_id}: {sum(sweep.seconds.values()):.0f} s", flush=True)
    sweeps = [LayerSweep.from_dict(json.loads(p.read_text())) for p in sorted(args.out.glob("*.json"))]
    sweeps = [s for s in sweeps if list(s.layers) == layers]
    if len(sweeps) < 3:
        print(f"only {len(sweeps)} facts finished; need 3 for a correlation")
        return
    figures = {"model": lm.name, "layers": layers, "n_facts": len(sweeps), "known": f"{len(ids)} of {len(cases)}",
               "samples": args.samples, "case_ids": [s.case["case_id"] for s in sweeps],
               "seconds_per_fact": sum(sum(s.seconds.values()) for s in sweeps) / len(sweeps), "statistics_s": stats_s,
               "correlations": {k: localisation_correlation(sweeps, k) for k in SCORES}}
    for k in SCORES:
        c = figures["correlations"][k]
        print(f"{k}: within-layer r {c['within_layer_pearson']['value']:+.3f} {c['within_layer_pearson']['ci']}, "
              f"spearman {c['spearman']['value']:+.3f}, R² layer {c['r2_layer']['value']:.3f} -> "
              f"+effect {c['r2_layer_and_effect']['value']:.3f}, same peak {c['same_peak_share']:.2f}")
    save_result(args, args.result_name, figures, threads=args.threads)


if __name__ == "__main__":
    main()
