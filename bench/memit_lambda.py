"""MEMIT's λ (``mom2_weight``) on held-out CounterFact records: one batch per λ, z computed once.

    python bench/memit_lambda.py --model gemma3-270m --records 1000-1019 \\
        --values 50000,15000,5000,1500,500 --result-name memit_lambda_gemma3

For each λ the same batch (the records ``--records``, by position in the CounterFact file, kept out of the
evaluation tables, which use the first records) is computed at the model's default MEMIT layers (or ``--layers``) from the
same z (optimised once, kept in ``--checkpoint``), applied, scored teacher-forced (ES / PS / NS and
magnitudes, as ``factscope evaluate``) and reverted. Also records, per λ, how much of the residual
change the post-MLP norm could not carry (models that have one). Writes ``bench/results/<name>.json``
in the shape ``render_docs.memit_lambda`` reads; the default λ is the largest within one point of
the best S (SmolLM2's rule), printed at the end.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.edit import MemitHyperParams, WeightBook, compute_memit, load_statistics  # noqa: E402
from tracer.evaluate import case_scores, load_cases, measure_probabilities  # noqa: E402
from tracer.evaluate.metrics import summarize  # noqa: E402
from tracer.commands import parse_layers  # noqa: E402
from tracer.models import load_model  # noqa: E402

COLUMNS = ("S", "ES", "PS", "NS", "EM", "PM", "NM")


def scores(lm, cases) -> dict:
    s = summarize([case_scores(measure_probabilities(lm, c)) for c in cases])
    return {k: round(s[k]["mean"], 1) for k in COLUMNS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--records", default="1000-1019", help="CounterFact records FIRST-LAST, by position in the file (held out)")
    ap.add_argument("--values", default="50000,15000,5000,1500,500,150", help="λ values, comma-separated")
    ap.add_argument("--layers", default=None, help="edited layers (default: the model's MEMIT default), e.g. 2-5")
    ap.add_argument("--checkpoint", type=Path, default=None, help="keep z here (default: a temporary folder)")
    add_result_arguments(ap, "memit_lambda")
    args = ap.parse_args()
    torch.set_num_threads(1)
    first, _, last = args.records.partition("-")
    first, last = int(first), int(last or first)
    lm = load_model(args.model, device="cpu")
    cases = load_cases("counterfact", limit=last + 1)[first:]  # records by position in the file
    overrides = {"layers": tuple(parse_layers(args.layers))} if args.layers else {}
    base = MemitHyperParams.for_model(lm, **overrides)
    statistics = load_statistics(lm, base, None)
    rows = [{"value": None, **scores(lm, cases)}]
    print(rows[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        zdir = args.checkpoint or Path(tmp)
        for value in [float(v) for v in args.values.split(",")]:
            hp = MemitHyperParams.for_model(lm, **overrides, mom2_weight=value)
            record = compute_memit(lm, cases, hp, statistics=statistics, checkpoint_dir=zdir, progress=False)
            row = {"value": value, **scores(lm, cases)}
            for k in ("post_norm_shortfall_mean", "post_norm_shortfall_max"):
                if k in record.timings:
                    row[k] = round(record.timings[k], 3)
            WeightBook.of(lm).revert(record)
            rows.append(row)
            print(row, flush=True)
    edited = rows[1:]
    best = max(r["S"] for r in edited)
    default = max(r["value"] for r in edited if r["S"] >= best - 1.0)
    print(f"default λ (largest within one point of the best S {best}): {default:,.0f}")
    figures = {"model": lm.name, "records": f"CounterFact {args.records} (held out)", "layers": list(base.layers),
               "parameter": "mom2_weight", "default": default, "rows": rows}
    save_result(args, args.result_name, figures, threads=1)


if __name__ == "__main__":
    main()
