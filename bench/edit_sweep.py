"""One editing setting swept on held-out CounterFact records: MEMIT's λ or FT-L's ε.

    python bench/edit_sweep.py --model gemma3-270m --method memit --records 1000-1019 \\
        --values 50000,15000,5000,1500,500,150 --result-name memit_lambda_gemma3
    python bench/edit_sweep.py --model gemma3-270m --method ft-l --records 1000-1019 \\
        --values 0.0005,0.001,0.002,0.005,0.01,0.02 --result-name ftl_epsilon_gemma3

The records ``--records`` (by position in the CounterFact file; the evaluation tables use the
first records, so these are held out) are edited once per value, scored teacher-forced (ES / PS /
NS and magnitudes, as ``factscope evaluate``) and the model reverted:

- ``memit``: λ = ``mom2_weight``; one batch of all records at the model's default MEMIT layers (or
  ``--layers``), from the same z (optimised once, kept in ``--checkpoint``); for models with a
  post-MLP norm also how much of the residual change the norm could not carry. The default is the
  largest λ within one point of the best S (SmolLM2's rule).
- ``ft-l``: ε = ``norm_constraint`` = ``lr``, one record at a time at the FT-L layer. The default
  is the largest ε whose NS stays within 10 points of the unedited model's (SmolLM2's rule).

Writes ``bench/results/<name>.json`` in the shape ``render_docs`` (``memit_lambda``,
``ftl_epsilon``) reads, and prints the default the rule picks.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.commands import parse_layers  # noqa: E402
from tracer.edit import MemitHyperParams, WeightBook, compute_memit, load_statistics  # noqa: E402
from tracer.evaluate import case_scores, load_cases, measure_probabilities  # noqa: E402
from tracer.evaluate.methods import make_method  # noqa: E402
from tracer.evaluate.metrics import summarize  # noqa: E402
from tracer.models import load_model  # noqa: E402
from tracer.progress import tqdm  # noqa: E402

COLUMNS = ("S", "ES", "PS", "NS", "EM", "PM", "NM")


def scores(per_case: list[dict]) -> dict:
    s = summarize(per_case)
    return {k: round(s[k]["mean"], 1) for k in COLUMNS}


def measure(lm, cases) -> list[dict]:
    return [case_scores(measure_probabilities(lm, c)) for c in cases]


def memit_rows(lm, cases, values: list[float], layers: str | None, checkpoint: Path | None) -> tuple[list[dict], dict]:
    overrides = {"layers": tuple(parse_layers(layers))} if layers else {}
    base = MemitHyperParams.for_model(lm, **overrides)
    statistics = load_statistics(lm, base, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for value in tqdm(values, desc="λ", unit="value"):
            hp = MemitHyperParams.for_model(lm, **overrides, mom2_weight=value)
            record = compute_memit(lm, cases, hp, statistics=statistics, checkpoint_dir=checkpoint or Path(tmp),
                                   progress=False)
            row = {"value": value, **scores(measure(lm, cases))}
            for k in ("post_norm_shortfall_mean", "post_norm_shortfall_max"):
                if k in record.timings:
                    row[k] = round(record.timings[k], 3)
            WeightBook.of(lm).revert(record)
            rows.append(row)
            print(row, flush=True)
    best = max(r["S"] for r in rows)
    return rows, {"layers": list(base.layers), "parameter": "mom2_weight",
                  "default": max(r["value"] for r in rows if r["S"] >= best - 1.0)}


def ftl_rows(lm, cases, values: list[float], unedited_ns: float) -> tuple[list[dict], dict]:
    rows = []
    for value in values:
        method = make_method("ft-l", lm, norm_constraint=value, lr=value)
        per_case = []
        for c in tqdm(cases, desc=f"ε {value:g}", unit="case"):
            handle = method.apply(lm, [c])
            try:
                per_case += measure(lm, [c])
            finally:
                method.revert(lm, handle)
        rows.append({"value": value, **scores(per_case)})
        print(rows[-1], flush=True)
    kept = [r["value"] for r in rows if r["NS"] >= unedited_ns - 10]
    return rows, {"layer": method.hp.layer, "steps": method.hp.steps, "parameter": "norm_constraint = lr",
                  "default": max(kept) if kept else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", choices=("memit", "ft-l"), default="memit")
    ap.add_argument("--records", default="1000-1019", help="CounterFact records FIRST-LAST, by position in the file")
    ap.add_argument("--values", required=True, help="the values, comma-separated (λ for memit, ε = lr for ft-l)")
    ap.add_argument("--layers", default=None, help="memit: edited layers (default: the model's), e.g. 2-5")
    ap.add_argument("--checkpoint", type=Path, default=None, help="memit: keep z here (default: a temporary folder)")
    add_result_arguments(ap, None)
    args = ap.parse_args()
    if args.result_name is None:
        ap.error("--result-name is required (memit_lambda, ftl_epsilon or a per-model name)")
    torch.set_num_threads(1)
    first, _, last = args.records.partition("-")
    first, last = int(first), int(last or first)
    lm = load_model(args.model, device="cpu")
    cases = load_cases("counterfact", limit=last + 1)[first:]
    values = [float(v) for v in args.values.split(",")]
    unedited = {"value": None, **scores(measure(lm, cases))}
    print(unedited, flush=True)
    if args.method == "memit":
        rows, extra = memit_rows(lm, cases, values, args.layers, args.checkpoint)
    else:
        rows, extra = ftl_rows(lm, cases, values, unedited["NS"])
    print(f"default ({'λ' if args.method == 'memit' else 'ε'}) by the rule: {extra['default']}")
    figures = {"model": lm.name, "records": f"CounterFact {args.records} (held out)", **extra, "rows": [unedited, *rows]}
    save_result(args, args.result_name, figures, threads=1)


if __name__ == "__main__":
    main()
