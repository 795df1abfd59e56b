"""ROME's update form and context templates on CounterFact, single and sequential edits (issue 19 part 0).

    for v in "" "--hparam update=original" "--hparam template_starts=words" "--hparam context_template_lengths=[]"; do
        factscope evaluate --method rome --dataset counterfact --limit 20 --no-generation $v --out out/rome-<variant>
    done
    python bench/rome_variants.py --single corrected=out/rome --single original=out/rome-original \\
        --single words=out/rome-words --single no-templates=out/rome-notemplates --sequential 10

Variants: ``corrected`` (the default: v* written at the key averaged over the context templates),
``original`` (the paper's form: the residual written at the bare prompt's key), ``words`` (the
corrected form with templates sampled from start words instead of a document-start token), ``no-templates``
(``"{}"`` alone: k* is the bare prompt's key, where both forms coincide). Single edits: the
``factscope evaluate`` runs given with ``--single`` (every row over the cases all runs finished).
Sequential edits: the first ``--sequential`` CounterFact records edited one after another on the
same model (each on the model the earlier ones edited), then all of them measured together, with
the perplexity of held-out Wikipedia text before and after; reverted between variants.
Writes ``bench/results/rome_variants.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import mean
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.edit import EditRequest, Ledger, ROMEHyperParams, rome_edit  # noqa: E402
from tracer.edit.sequential import heldout_texts, perplexity  # noqa: E402
from tracer.edit.statistics import statistics_at  # noqa: E402
from tracer.edit.templates import rome_templates  # noqa: E402
from tracer.evaluate import case_scores, load_cases, measure_probabilities  # noqa: E402
from tracer.evaluate.harness import build_summary  # noqa: E402
from tracer.evaluate.metrics import generation_scores, greedy_outcomes  # noqa: E402
from tracer.files import write_json_atomic  # noqa: E402
from tracer.models import load_model  # noqa: E402
from tracer.targets import spaced  # noqa: E402

VARIANTS = {"corrected": {}, "original": {"update": "original"}, "words": {"template_starts": "words"},
            "no-templates": {"context_template_lengths": ()}}
COLUMNS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "ES-g", "PS-g", "NS+", "NKL")
KEYS = {"ES": "rewrite_success", "PS": "paraphrase_success", "NS": "neighborhood_success", "EM": "rewrite_diff",
        "PM": "paraphrase_diff", "NM": "neighborhood_diff", "ES-g": "rewrite_gen_success",
        "PS-g": "paraphrase_gen_success", "NS+": "neighborhood_plus_success"}


def single_rows(pairs: list[str]) -> list[dict]:
    runs = [(name, Path(d)) for name, _, d in (p.partition("=") for p in pairs)]
    done = [{int(f.stem) for f in (d / "cases").glob("*.json")} for _, d in runs]
    ids = sorted(set.intersection(*done))
    rows = []
    for name, d in runs:
        s = build_summary(d, cases=[SimpleNamespace(case_id=i) for i in ids])
        rows.append({"variant": name, "n": len(ids), "seconds_per_edit": round(s["seconds_per_edit"], 1),
                     **{c: round(s["post"][c]["mean"], 3 if c == "NKL" else 1) for c in COLUMNS if c in s["post"]}})
    return rows


def sequential_rows(n: int) -> list[dict]:
    lm = load_model("smollm2-135m", device="cpu")
    cases = load_cases("counterfact", limit=n)
    texts = heldout_texts()
    ppl0 = perplexity(lm, texts)
    rows = []
    for name, overrides in VARIANTS.items():
        hp = ROMEHyperParams.for_model(lm, **overrides)
        stats = statistics_at(lm, hp.layer, None, hp.stats_tokens)
        templates = rome_templates(lm, hp)
        ledger = Ledger(lm)
        t0 = time.perf_counter()
        for c in cases:
            req = EditRequest(c.prompt, c.subject, spaced(c.target_new), spaced(c.target_true))
            ledger.apply(rome_edit(lm, req, hp, stats, context_templates=templates, progress=False))
        seconds = time.perf_counter() - t0
        scores = [{**case_scores(measure_probabilities(lm, c)), **generation_scores(g, c)}
                  for c, g in zip(cases, greedy_outcomes(lm, cases))]
        row = {"variant": name, "n": n, "seconds_per_edit": round(seconds / n, 1),
               "perplexity": [round(ppl0, 3), round(perplexity(lm, texts), 3)],
               **{c: round(100 * mean(s[k] for s in scores), 1) for c, k in KEYS.items()}}
        ledger.revert_all()
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", action="append", default=[], metavar="VARIANT=DIR", help="an evaluate run of a variant")
    ap.add_argument("--sequential", type=int, default=10, help="sequential edits per variant (0: none)")
    ap.add_argument("--sequential-file", type=Path, default=None,
                    help="keep the sequential rows here; a later run reads them instead of editing again")
    ap.add_argument("--command", default=None, help="the evaluate commands of the single runs (recorded)")
    add_result_arguments(ap, "rome_variants")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.sequential_file is not None and args.sequential_file.is_file():
        sequential = json.loads(args.sequential_file.read_text())
    else:
        sequential = sequential_rows(args.sequential) if args.sequential else []
        if args.sequential_file is not None:
            write_json_atomic(args.sequential_file, sequential, indent=1)
    figures = {"model": "smollm2-135m", "single": single_rows(args.single) if args.single else [], "sequential": sequential}
    own = ["python bench/rome_variants.py", *[f"--single {x}" for x in args.single], f"--sequential {args.sequential}"]
    save_result(args, args.result_name, figures, command="; ".join(filter(None, [args.command, " ".join(own)])), threads=1)


if __name__ == "__main__":
    main()
